"""moe-cluster core: model families, checkpoint loading, MoE layer, in-process engine.

Nothing in this package imports Ray: `deployments/` places it on a cluster.
"""
