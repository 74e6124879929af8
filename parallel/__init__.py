"""Running one stream or many over ranks: the device mesh, cascades of in-flight blocks, Ulysses
sequence parallelism, replica links, failing loudly when a rank stops.

May import: engine/ (never cache/ or launch/). Main entry points: `topology.Topology`,
`cascade.CascadeRank`, `ulysses.GroupExchange`, `runtime.launched`, `replicas.replica_links`.
"""
