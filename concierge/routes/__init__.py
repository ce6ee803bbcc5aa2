"""HTTP routes of the API, one module per domain: they translate requests into calls on the
domain packages and never hold domain logic of their own."""
