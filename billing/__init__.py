"""The billing domain: ledger, subscriptions, Stripe gateway, webhooks, auth rules and errors.

Nothing in this package knows about HTTP; handlers call into it and shape its results.
"""
