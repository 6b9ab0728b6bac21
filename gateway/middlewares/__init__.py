"""One middleware a module; `gateway.app.create_app` alone decides their order."""
