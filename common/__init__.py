"""What the fedgrpc server and client share: codec, models, data, partitioning, config.

Nothing here imports fedgrpc.server or fedgrpc.client.
"""
