//! [`KvStore`](crate::KvStore) on etcd's v3 API through the `etcd-client` crate, with
//! TLS when given a CA (and a client certificate and key).
//!
//! SCAFFOLD: to be written (issue 12, helper "etcd").
