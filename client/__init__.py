"""A fedgrpc client: joins a run, trains on its own data each round, sends back weights."""
