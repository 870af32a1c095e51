//! NodePort translation state: the layouts of the `hypha_lb4_nat` / `hypha_lb6_nat`
//! maps (the TC program on the node's external device and its reverse translation in
//! `hypha_from_pod` / `hypha_from_tunnel`).
//!
//! SCAFFOLD: the NodePort work defines these layouts (keys for both directions of a
//! translated flow, the original destination and, for `externalTrafficPolicy: Cluster`
//! to another node's backend, the source it was given), with every reader named.
