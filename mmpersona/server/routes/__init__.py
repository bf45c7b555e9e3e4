"""The API's routes, one router per resource: `service` (health, models), `chat`, `images`, `concepts` and
`profile`. Each route takes the shared parts from `dependencies.server` and the caller from `dependencies.user_of`."""
