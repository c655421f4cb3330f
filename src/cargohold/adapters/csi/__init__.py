"""The Kubernetes CSI driver (spec v1.12), served by the node over gRPC on a unix socket.

Every node serves the Identity, Controller and Node services on one socket (the node
decides where: ``--csi-endpoint``). The messages come from ``csi.proto`` beside this module;
its Python modules are generated when cargohold is built.

- Volume IDs are cargohold volume names. A CSI name that is a valid cargohold name is used
  as it is; any other (too long, other characters) becomes a readable prefix plus a hash
  of the whole name. The CSI name and the access types a volume was created for are kept
  in the metadata store under ``csi/volumes/NAME``, so a repeated CreateVolume finds its
  volume and a different CSI name that maps to the same volume name is refused.
- ControllerPublishVolume records the one node that may stage a volume
  (``csi/published/NAME``); NodeStageVolume on another node is refused.
- NodeStageVolume attaches the volume here: with mount access the agent mounts the file
  system and the staging path becomes a bind mount of it; with block access the agent
  stops at the loop device (never formatted) and nothing is mounted. NodePublishVolume
  bind-mounts the staging path (mount) or the loop device (block, onto a file) at the
  target path. What is staged and published on this host is kept in
  ``STATE_DIR/csi-node.json``.
- Expansion is online: ControllerExpandVolume grows the replicas and the record (whole MiB,
  never shrinking) and, for a block volume attached on this node, its loop device;
  NodeExpandVolume grows the engine's file, the loop device and the file system of a
  volume staged here (``Agent.expand``).
- Every call is idempotent. Errors map to gRPC status codes in one place:
  :func:`.rpc.grpc_status`.

Modules: ``rpc`` (constants, request checks, error mapping), ``identity``, ``controller``
and ``node`` (the three services), ``server`` (the gRPC server on the socket).
"""
