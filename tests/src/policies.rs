//! Policy documents several integration tests apply.

/// A NetworkPolicy in `default`: pods `app=server` accept TCP 8080 from pods `app=client`
/// only.
pub const ALLOW_CLIENT_8080: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: server-from-client
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: server
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: client
    ports:
    - protocol: TCP
      port: 8080
"#;
