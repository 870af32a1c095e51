//! The service parser: what it reads, and every refusal with its message.

use std::net::IpAddr;

use super::*;
use crate::policy::{PROTO_TCP, PROTO_UDP};

fn ok(content: &str) -> Vec<Document> {
    parse_file("f.yaml", content).unwrap_or_else(|e| panic!("{e}"))
}

fn service(content: &str) -> Service {
    match ok(content).as_slice() {
        [Document::Service(s)] => s.clone(),
        other => panic!("not one service: {other:?}"),
    }
}

fn err(content: &str) -> String {
    parse_file("f.yaml", content).unwrap_err().to_string()
}

/// Asserts that `content` is refused with a message containing `want`.
#[track_caller]
fn refused(content: &str, want: &str) {
    let msg = err(content);
    assert!(msg.starts_with("f.yaml: "), "{msg}");
    assert!(msg.contains(want), "want {want:?} in: {msg}");
}

const HEAD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n";

/// A service with `spec` (YAML lines, indented by two).
fn svc(spec: &str) -> String {
    format!("{HEAD}spec:\n{spec}")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_minimal_service_takes_kubernetes_defaults() {
    let s = service(&svc("  selector: {app: web}\n  ports: [{port: 80}]\n"));
    assert_eq!(s.namespace, "default");
    assert_eq!(s.name, "web");
    assert_eq!(s.kind, ServiceType::ClusterIP);
    assert!(s.cluster_ips.is_empty());
    assert!(s.ip_families.is_empty());
    assert_eq!(s.ip_family_policy, IpFamilyPolicy::SingleStack);
    assert_eq!(
        s.ports,
        vec![ServicePort {
            name: String::new(),
            protocol: PROTO_TCP,
            port: 80,
            target_port: TargetPort::Number(80),
            node_port: None,
        }]
    );
    assert_eq!(
        s.selector,
        Some(Labels::from([("app".to_owned(), "web".to_owned())]))
    );
    assert_eq!(s.session_affinity, None);
    assert!(!s.external_local && !s.internal_local);
    assert_eq!(s.key(), "default/web");
}

/// What `kubectl get svc -o yaml` prints for a dual-stack NodePort service.
const KUBECTL: &str = r#"
apiVersion: v1
kind: Service
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"v1","kind":"Service"}
  creationTimestamp: "2024-01-01T00:00:00Z"
  labels: {app: web}
  name: web
  namespace: shop
  resourceVersion: "1234"
  uid: 0b7b9c2e-0000-0000-0000-000000000000
  managedFields:
  - manager: kubectl
    operation: Update
  finalizers: []
  ownerReferences: []
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::a"]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Cluster
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  ports:
  - name: http
    nodePort: 30080
    port: 80
    protocol: TCP
    targetPort: http-alt
    appProtocol: http
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 5353
  selector: {app: web, tier: front}
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP: {timeoutSeconds: 600}
  type: NodePort
status:
  loadBalancer: {}
"#;

#[test]
fn kubectl_output_is_read_and_its_noise_ignored() {
    let s = service(KUBECTL);
    assert_eq!(s.key(), "shop/web");
    assert_eq!(s.kind, ServiceType::NodePort);
    assert_eq!(s.cluster_ips, vec![ip("10.96.0.10"), ip("fd00:10:96::a")]);
    assert_eq!(s.ip_families, vec![IpFamily::IPv4, IpFamily::IPv6]);
    assert_eq!(s.ip_family_policy, IpFamilyPolicy::PreferDualStack);
    assert_eq!(s.ports.len(), 2);
    assert_eq!(s.ports[0].name, "http");
    assert_eq!(
        s.ports[0].target_port,
        TargetPort::Name("http-alt".to_owned())
    );
    assert_eq!(s.ports[0].node_port, Some(30080));
    assert_eq!(s.ports[1].protocol, PROTO_UDP);
    assert_eq!(s.ports[1].target_port, TargetPort::Number(5353));
    assert_eq!(s.ports[1].node_port, None);
    assert_eq!(s.session_affinity, Some(600));
    assert!(s.external_local);
    assert!(!s.internal_local);
    assert_eq!(s.selector.as_ref().map(|l| l.len()), Some(2));
}

#[test]
fn json_and_lists_and_several_documents_are_read() {
    let json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"x"},
        "spec":{"ports":[{"port":443,"targetPort":8443}],"selector":{"app":"a"}}}"#;
    let docs = parse_file("f.json", json).unwrap();
    assert!(
        matches!(&docs[..], [Document::Service(s)] if s.key() == "x/a"
        && s.ports[0].target_port == TargetPort::Number(8443))
    );

    let list = r#"{"apiVersion":"v1","kind":"List","metadata":{"resourceVersion":""},"items":[
        {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":1}]}},
        {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"a-1",
         "labels":{"kubernetes.io/service-name":"a"}},"addressType":"IPv4",
         "endpoints":[{"addresses":["10.0.0.1"]}],"ports":[{"port":8080}]}]}"#;
    let docs = parse_file("f.json", list).unwrap();
    assert_eq!(docs.len(), 2);
    assert!(matches!(&docs[1], Document::Slice(s) if s.service == "a"));

    let yaml = format!(
        "{}\n---\n{}---\n",
        svc("  ports: [{port: 1}]\n"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 2}]}\n"
    );
    let docs = ok(&yaml);
    assert_eq!(docs.len(), 2);

    let yaml_list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  \
                     metadata: {name: c}\n  spec: {ports: [{port: 3}]}\n";
    assert_eq!(ok(yaml_list).len(), 1);
}

#[test]
fn errors_name_the_document_and_the_field_path() {
    let two = format!(
        "{}---\n{}",
        svc("  ports: [{port: 1}]\n"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec:\n  ports:\n  - {name: a, port: 1}\n  - {name: b, port: 2, targetPort: \"8080\"}\n"
    );
    refused(
        &two,
        "document 2: spec.ports[1].targetPort: \"8080\" is a string of digits",
    );
    // serde's own errors carry the path too.
    refused(
        &svc("  ports: [{port: eighty}]\n"),
        "spec.ports[0].port: invalid type: string \"eighty\"",
    );
    // In a List: the item.
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  \
                metadata: {name: c}\n  spec: {ports: [{port: 0}]}\n";
    refused(
        list,
        "items[0].spec.ports[0].port: port 0 is out of range (1 to 65535)",
    );
    // JSON.
    let json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},
        "spec":{"ports":[{"port":80,"protocol":"SCTP"}]}}"#;
    let msg = parse_file("f.json", json).unwrap_err().to_string();
    assert_eq!(
        msg,
        "f.json: spec.ports[0].protocol: SCTP is not supported (TCP or UDP)"
    );
    // YAML syntax errors carry the line.
    refused("apiVersion: v1\nkind: [\n", "line");
}

#[test]
fn the_whole_file_is_refused_for_one_bad_document() {
    let yaml = format!(
        "{}---\n{}",
        svc("  ports: [{port: 1}]\n"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {type: LoadBalancer, ports: [{port: 2}]}\n"
    );
    refused(
        &yaml,
        "document 2: spec.type: LoadBalancer services are not supported",
    );
}

#[test]
fn kinds_and_versions_outside_services_are_refused_by_name() {
    refused(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\n",
        "kind NetworkPolicy (networking.k8s.io/v1) is not a service document",
    );
    refused(
        "apiVersion: v2\nkind: Service\nmetadata: {name: x}\n",
        "apiVersion v2 is not supported for Service; use v1",
    );
    refused(
        "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: x}\n",
        "apiVersion discovery.k8s.io/v1beta1 is not supported for EndpointSlice",
    );
    refused(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {name: x}\n",
        "kind Endpoints is not supported",
    );
    refused(
        "metadata: {name: x}\n",
        "a document needs apiVersion and kind",
    );
    refused("- 1\n- 2\n", "a document must be a mapping");
    refused(
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: List, items: []}\n",
        "items[0]: a List may not hold a List",
    );
}

#[test]
fn names_and_namespaces_are_checked() {
    refused(
        "apiVersion: v1\nkind: Service\nmetadata: {name: Web}\nspec: {ports: [{port: 1}]}\n",
        "metadata.name \"Web\" is not a valid name",
    );
    refused(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a.b}\nspec: {ports: [{port: 1}]}\n",
        "metadata.name \"a.b\" is not a valid service name",
    );
    refused(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: -x}\nspec: {ports: [{port: 1}]}\n",
        "metadata.namespace \"-x\" is not a valid namespace name",
    );
    refused(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, colour: red}\nspec: {ports: [{port: 1}]}\n",
        "metadata.colour: unknown field `colour`",
    );
    let twice = format!(
        "{}---\n{}",
        svc("  ports: [{port: 1}]\n"),
        svc("  ports: [{port: 2}]\n")
    );
    refused(&twice, "Service default/web is defined twice in this file");
}

#[test]
fn unsupported_spec_fields_are_refused_by_name() {
    for (field, yaml) in [
        ("externalIPs", "  externalIPs: [1.2.3.4]\n"),
        ("loadBalancerIP", "  loadBalancerIP: 1.2.3.4\n"),
        (
            "loadBalancerSourceRanges",
            "  loadBalancerSourceRanges: [0.0.0.0/0]\n",
        ),
        ("healthCheckNodePort", "  healthCheckNodePort: 30000\n"),
        ("externalName", "  externalName: example.com\n"),
        (
            "allocateLoadBalancerNodePorts",
            "  allocateLoadBalancerNodePorts: true\n",
        ),
    ] {
        refused(
            &svc(&format!("  ports: [{{port: 1}}]\n{yaml}")),
            &format!("spec.{field}: is not supported by Hypha"),
        );
    }
    refused(
        &svc("  ports: [{port: 1}]\n  colour: red\n"),
        "spec.colour: unknown field `colour`",
    );
    refused(
        &svc("  ports: [{port: 1, colour: red}]\n"),
        "spec.ports[0].colour: unknown field `colour`",
    );
}

#[test]
fn types_are_checked() {
    refused(
        &svc("  type: ExternalName\n  ports: [{port: 1}]\n"),
        "spec.type: ExternalName services are not supported",
    );
    refused(
        &svc("  type: Magic\n  ports: [{port: 1}]\n"),
        "spec.type: unknown type \"Magic\" (ClusterIP or NodePort)",
    );
    let s = service(&svc("  type: NodePort\n  ports: [{port: 1}]\n"));
    assert_eq!(s.kind, ServiceType::NodePort);
    assert_eq!(s.ports[0].node_port, None);
}

#[test]
fn cluster_ips_are_checked() {
    refused(
        &svc("  clusterIP: None\n  ports: [{port: 1}]\n"),
        "spec.clusterIP: headless services (clusterIP: None) are not supported",
    );
    refused(
        &svc("  clusterIPs: [None]\n  ports: [{port: 1}]\n"),
        "spec.clusterIPs[0]: headless services",
    );
    refused(
        &svc("  clusterIP: 10.96.0.300\n  ports: [{port: 1}]\n"),
        "spec.clusterIP: \"10.96.0.300\" is not an IP address",
    );
    refused(
        &svc("  clusterIP: 10.96.0.1\n  clusterIPs: [10.96.0.2]\n  ports: [{port: 1}]\n"),
        "spec.clusterIP: 10.96.0.1 does not agree with clusterIPs[0] 10.96.0.2",
    );
    refused(
        &svc("  clusterIPs: [10.96.0.1, 10.96.0.2]\n  ports: [{port: 1}]\n"),
        "spec.clusterIPs: two addresses must be of different families",
    );
    refused(
        &svc("  clusterIPs: [10.96.0.1, \"fd00::1\", 10.96.0.3]\n  ports: [{port: 1}]\n"),
        "spec.clusterIPs: at most two addresses",
    );
    // Agreeing, and "" meaning "allocate".
    let s = service(&svc(
        "  clusterIP: 10.96.0.1\n  clusterIPs: [10.96.0.1]\n  ports: [{port: 1}]\n",
    ));
    assert_eq!(s.cluster_ips, vec![ip("10.96.0.1")]);
    let s = service(&svc("  clusterIP: \"\"\n  ports: [{port: 1}]\n"));
    assert!(s.cluster_ips.is_empty());
    // Two addresses without a policy: RequireDualStack, as Kubernetes defaults it.
    let s = service(&svc(
        "  clusterIPs: [\"fd00::1\", 10.96.0.1]\n  ports: [{port: 1}]\n",
    ));
    assert_eq!(s.ip_family_policy, IpFamilyPolicy::RequireDualStack);
}

#[test]
fn families_and_family_policies_are_checked() {
    refused(
        &svc("  ipFamilies: [IPv5]\n  ports: [{port: 1}]\n"),
        "spec.ipFamilies[0]: unknown family \"IPv5\" (IPv4 or IPv6)",
    );
    refused(
        &svc("  ipFamilies: [IPv4, IPv4]\n  ports: [{port: 1}]\n"),
        "spec.ipFamilies[1]: IPv4 is given twice",
    );
    refused(
        &svc("  clusterIP: 10.96.0.1\n  ipFamilies: [IPv6]\n  ports: [{port: 1}]\n"),
        "spec.ipFamilies[0]: IPv6 does not agree with clusterIPs[0] 10.96.0.1",
    );
    refused(
        &svc("  ipFamilyPolicy: Maybe\n  ports: [{port: 1}]\n"),
        "spec.ipFamilyPolicy: unknown policy \"Maybe\"",
    );
    refused(
        &svc("  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4, IPv6]\n  ports: [{port: 1}]\n"),
        "spec.ipFamilyPolicy: SingleStack, but two families or addresses are given",
    );
    let s = service(&svc(
        "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  ports: [{port: 1}]\n",
    ));
    assert_eq!(s.ip_families, vec![IpFamily::IPv6, IpFamily::IPv4]);
    assert_eq!(s.ip_family_policy, IpFamilyPolicy::RequireDualStack);
}

#[test]
fn ports_are_checked() {
    refused(
        &svc("  selector: {}\n"),
        "spec.ports: a service needs at least one port",
    );
    refused(
        &svc("  ports: []\n"),
        "spec.ports: a service needs at least one port",
    );
    refused(
        &svc("  ports: [{port: 65536}]\n"),
        "spec.ports[0].port: port 65536 is out of range (1 to 65535)",
    );
    refused(
        &svc("  ports: [{port: 1, protocol: ICMP}]\n"),
        "spec.ports[0].protocol: unknown protocol \"ICMP\" (TCP or UDP)",
    );
    refused(
        &svc("  ports: [{name: a, port: 1}, {port: 2}]\n"),
        "spec.ports[1].name: required when a service has more than one port",
    );
    refused(
        &svc("  ports: [{name: a, port: 1}, {name: a, port: 2}]\n"),
        "spec.ports[1].name: \"a\" is also the name of spec.ports[0]",
    );
    refused(
        &svc("  ports: [{name: a, port: 1}, {name: b, port: 1}]\n"),
        "spec.ports[1]: port 1/TCP is also spec.ports[0]",
    );
    refused(
        &svc("  ports: [{name: Http, port: 1}]\n"),
        "spec.ports[0].name: \"Http\" is not a valid port name",
    );
    refused(
        &svc("  ports: [{port: 1, targetPort: 70000}]\n"),
        "spec.ports[0].targetPort: port 70000 is out of range",
    );
    refused(
        &svc("  ports: [{port: 1, targetPort: \"not_a_name\"}]\n"),
        "spec.ports[0].targetPort: \"not_a_name\" is not a valid port name",
    );
    refused(
        &svc("  ports: [{port: 1, targetPort: [1]}]\n"),
        "spec.ports[0].targetPort: [1] is neither a port number nor a port name",
    );
    refused(
        &svc("  ports: [{port: 1, nodePort: 30001}]\n"),
        "spec.ports[0].nodePort: 30001 is given but the service is not of type NodePort",
    );
    refused(
        &svc("  type: NodePort\n  ports: [{port: 1, nodePort: 8080}]\n"),
        "spec.ports[0].nodePort: 8080 is outside the NodePort range (30000-32767)",
    );
    refused(
        &svc(
            "  type: NodePort\n  ports: [{name: a, port: 1, nodePort: 30001}, {name: b, port: 2, nodePort: 30001}]\n",
        ),
        "spec.ports[1].nodePort: 30001/TCP is also the nodePort of spec.ports[0]",
    );
    // The same port number over TCP and UDP (DNS) is fine, as is the same node port.
    let s = service(&svc(
        "  type: NodePort\n  ports:\n  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}\n  - {name: dns-tcp, port: 53, nodePort: 30053}\n",
    ));
    assert_eq!(s.ports.len(), 2);
}

#[test]
fn selectors_affinity_and_traffic_policies_are_checked() {
    let s = service(&svc("  selector: {}\n  ports: [{port: 1}]\n"));
    assert_eq!(s.selector, Some(Labels::new()));
    refused(
        &svc("  selector: {\"\": x}\n  ports: [{port: 1}]\n"),
        "spec.selector",
    );
    let s = service(&svc("  sessionAffinity: ClientIP\n  ports: [{port: 1}]\n"));
    assert_eq!(s.session_affinity, Some(DEFAULT_AFFINITY_TIMEOUT_S));
    refused(
        &svc("  sessionAffinity: Cookie\n  ports: [{port: 1}]\n"),
        "spec.sessionAffinity: unknown affinity \"Cookie\" (None or ClientIP)",
    );
    refused(
        &svc(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n  ports: [{port: 1}]\n",
        ),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is out of range (1 to 86400 seconds)",
    );
    refused(
        &svc(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n  ports: [{port: 1}]\n",
        ),
        "timeoutSeconds: 0 is out of range",
    );
    refused(
        &svc("  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10}}\n  ports: [{port: 1}]\n"),
        "spec.sessionAffinityConfig: only with sessionAffinity: ClientIP",
    );
    refused(
        &svc("  externalTrafficPolicy: Local\n  ports: [{port: 1}]\n"),
        "spec.externalTrafficPolicy: Local applies to NodePort services only",
    );
    refused(
        &svc("  externalTrafficPolicy: Global\n  ports: [{port: 1}]\n"),
        "spec.externalTrafficPolicy: unknown policy \"Global\" (Cluster or Local)",
    );
    refused(
        &svc("  internalTrafficPolicy: Nearby\n  ports: [{port: 1}]\n"),
        "spec.internalTrafficPolicy: unknown policy \"Nearby\"",
    );
    let s = service(&svc(
        "  internalTrafficPolicy: Local\n  ports: [{port: 1}]\n",
    ));
    assert!(s.internal_local);
    refused(
        &svc("  publishNotReadyAddresses: true\n  ports: [{port: 1}]\n"),
        "spec.publishNotReadyAddresses: true is not supported",
    );
    service(&svc(
        "  publishNotReadyAddresses: false\n  ports: [{port: 1}]\n",
    ));
}

const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-abc12
  namespace: shop
  labels:
    kubernetes.io/service-name: db
    endpointslice.kubernetes.io/managed-by: operator
  generation: 1
addressType: IPv6
endpoints:
- addresses: ["fd00::1"]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-a
  hostname: db-0
  targetRef: {kind: Pod, name: db-0, namespace: shop}
  zone: z1
- addresses: ["fd00::2", "fd00::3"]
  conditions: {ready: false}
- addresses: ["fd00::4"]
ports:
- {name: sql, port: 5432, protocol: TCP, appProtocol: postgresql}
- {port: 9000, protocol: UDP}
"#;

#[test]
fn endpoint_slices_are_read() {
    let docs = ok(SLICE);
    let [Document::Slice(s)] = docs.as_slice() else {
        panic!("{docs:?}")
    };
    assert_eq!(s.key(), "shop/db-abc12");
    assert_eq!(s.service, "db");
    assert_eq!(s.family, IpFamily::IPv6);
    assert_eq!(s.endpoints.len(), 3);
    assert_eq!(s.endpoints[0].node.as_deref(), Some("node-a"));
    assert!(s.endpoints[0].ready);
    assert!(!s.endpoints[1].ready);
    assert_eq!(s.endpoints[1].addresses.len(), 2);
    assert!(s.endpoints[2].ready, "absent conditions read as ready");
    assert_eq!(
        s.ports,
        vec![
            SlicePort {
                name: "sql".to_owned(),
                protocol: PROTO_TCP,
                port: 5432
            },
            SlicePort {
                name: String::new(),
                protocol: PROTO_UDP,
                port: 9000
            },
        ]
    );
}

#[test]
fn endpoint_slices_are_checked() {
    let slice = |body: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\n  labels: {{kubernetes.io/service-name: db}}\n{body}"
        )
    };
    refused(
        &slice("addressType: FQDN\n"),
        "addressType: FQDN is not supported (IPv4 or IPv6)",
    );
    refused(
        &slice("addressType: IPX\n"),
        "addressType: unknown type \"IPX\"",
    );
    refused(&slice("endpoints: []\n"), "missing field `addressType`");
    refused(
        &slice("addressType: IPv4\nendpoints: [{addresses: []}]\n"),
        "endpoints[0].addresses: an endpoint needs at least one address",
    );
    refused(
        &slice("addressType: IPv4\nendpoints: [{addresses: [\"fd00::1\"]}]\n"),
        "endpoints[0].addresses[0]: fd00::1 is not of the slice's addressType IPv4",
    );
    refused(
        &slice("addressType: IPv4\nendpoints: [{addresses: [x]}]\n"),
        "endpoints[0].addresses[0]: \"x\" is not an IP address",
    );
    refused(
        &slice("addressType: IPv4\nports: [{name: a}]\n"),
        "ports[0].port: required",
    );
    refused(
        &slice("addressType: IPv4\nports: [{name: a, port: 1}, {name: a, port: 2}]\n"),
        "ports[1]: name \"a\"/TCP is also ports[0]",
    );
    refused(
        &slice("addressType: IPv4\nendpoints: [{addresses: [10.0.0.1], colour: red}]\n"),
        "endpoints[0].colour: unknown field `colour`",
    );
    refused(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\n",
        "metadata.labels: the label kubernetes.io/service-name (the service this slice serves) is required",
    );
    refused(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: A_B}}\naddressType: IPv4\n",
        "metadata.labels.kubernetes.io/service-name: \"A_B\" is not a valid service name",
    );
}

#[test]
fn the_size_and_nesting_limits_hold() {
    let bomb = format!("{HEAD}spec: {}", "[".repeat(20_000));
    refused(&bomb, "nesting deeper than 64 levels");
}

#[test]
fn empty_documents_are_skipped() {
    assert!(ok("").is_empty());
    assert_eq!(
        ok(&format!("---\n{}---\n", svc("  ports: [{port: 1}]\n"))).len(),
        1
    );
}
