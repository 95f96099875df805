"""The node plugin's loops: the agent that reconciles this node's ReflinkVolumes on disk, and
the node's space (free space on the Node, each volume's own bytes, metrics)."""
