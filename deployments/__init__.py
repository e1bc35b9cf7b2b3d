"""Ray Serve layer (expert workers, router, ingress): arrives with the serving issue.

Nothing here yet; `cluster/` runs on its own through `moe-cluster generate`.
"""
