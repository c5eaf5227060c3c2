"""A fedgrpc client: joins a run, trains on its own data each round, sends back weights.

`fl-client` runs a task file; a training script of your own becomes a client with the few
verbs of fedgrpc.client.api, exported here:

    import fedgrpc.client as fl
    federation = fl.connect()
    for round in federation.rounds(model):
        model.fit(x, y)
        round.submit(model, num_examples=len(x))
"""

from .api import Federation, Round, connect

__all__ = ["Federation", "Round", "connect"]
