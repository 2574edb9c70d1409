"""HTTP layer: Connexion routes each operationId here. Handlers read the validated request,
call one service function and shape its result; they hold no SQL and no Stripe calls."""
