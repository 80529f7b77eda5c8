"""Scale-out: meshes and the logical-axis rules that place each leaf on them (`rules`), the
per-device memory planner (`memory`), multi-host start-up (`distributed`) and the MoE kernels run
per device under shard_map (`mesh_kernels`)."""
