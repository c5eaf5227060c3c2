"""The fedgrpc coordinator: round state machine, aggregation, persistence, gRPC servicer."""
