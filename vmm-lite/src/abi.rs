//! The guest ABI: memory map, ports, request codes and in-memory structure layouts,
//! shared verbatim with the guest program (guest/src/abi.rs).

include!("../guest/src/abi.rs");
