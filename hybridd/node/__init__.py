"""The node service: what this node serves (catalog), how big a request is (sizing), where it runs (router),
what it has to run on (resources), its peers (peering) and `hybridd plan` (planning). It sits between the adapters
(probe/, engine/, peer/) and the edges (api/, cli, daemon)."""
