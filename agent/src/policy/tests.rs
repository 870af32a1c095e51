//! The parser and the compiler against Kubernetes' (and Cilium's) semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hypha_common::{
    DIR_EGRESS, DIR_INGRESS, ENDPOINT_F_EGRESS_POLICY, ENDPOINT_F_INGRESS_AUDIT,
    ENDPOINT_F_INGRESS_POLICY, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD,
    IDENTITY_WORLD6, POLICY_ALLOW, POLICY_DENY, POLICY_F_AUDIT, PolicyKey,
};
use ipnet::IpNet;

use super::*;

const HOST: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn prefix(a: impl Into<IpAddr>) -> IpNet {
    IpNet::from(a.into())
}

fn parse(yaml: &str) -> Vec<Policy> {
    parse_file("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn parse_err(yaml: &str) -> String {
    parse_file("test.yaml", yaml).unwrap_err().to_string()
}

/// An endpoint `id` at 10.244.0.<id> in `ns` with `labels`.
fn ep(id: u32, ns: &str, labels: &[(&str, &str)]) -> PolicyEndpoint {
    let mut l: Labels = labels
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    l.insert(NAMESPACE_LABEL.into(), ns.into());
    l.insert("k8s:pod".into(), format!("pod-{id}"));
    PolicyEndpoint::new(id, Ipv4Addr::new(10, 244, 0, id as u8), &l)
}

struct World {
    endpoints: Vec<PolicyEndpoint>,
    namespaces: BTreeMap<String, Labels>,
    /// Other nodes' addresses (the remote-node identity's).
    remote_nodes: Vec<IpAddr>,
}

impl World {
    fn new(endpoints: Vec<PolicyEndpoint>) -> Self {
        Self {
            endpoints,
            namespaces: BTreeMap::new(),
            remote_nodes: Vec::new(),
        }
    }

    fn compile(&self, policies: &[Policy]) -> Compiled {
        compile(
            policies,
            &self.endpoints,
            &self.namespaces,
            &IdentityAllocator::default(),
            &[HOST.into()],
            &self.remote_nodes,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

fn identity_of(c: &Compiled, ep: &PolicyEndpoint) -> u32 {
    let id = c.ipcache[&prefix(ep.addresses().next().expect("an address"))];
    for a in ep.addresses() {
        assert_eq!(
            c.ipcache[&prefix(a)],
            id,
            "every address of {} has its identity",
            ep.id
        );
    }
    id
}

/// The (identity, proto, port) an endpoint allows in a direction, without the implicit
/// host entry.
fn allowed(c: &Compiled, ep: u32, dir: u8) -> BTreeSet<(u32, u8, u16)> {
    c.entries
        .iter()
        .filter(|(k, e)| {
            k.endpoint_id == ep
                && k.direction == dir
                && e.action == POLICY_ALLOW
                && !(k.identity == IDENTITY_HOST && e.policy_id == 0)
        })
        .map(|(k, _)| (k.identity, k.proto, k.dport))
        .collect()
}

fn denied(c: &Compiled, ep: u32, dir: u8) -> BTreeSet<(u32, u8, u16)> {
    c.entries
        .iter()
        .filter(|(k, e)| k.endpoint_id == ep && k.direction == dir && e.action == POLICY_DENY)
        .map(|(k, _)| (k.identity, k.proto, k.dport))
        .collect()
}

fn tcp(id: u32, port: u16) -> (u32, u8, u16) {
    (id, PROTO_TCP, port)
}

// ------------------------------------------------------------------ parsing

#[test]
fn kubernetes_policy_parses_with_defaults() {
    let p = parse(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
  namespace: shop
  labels: {team: a}
  resourceVersion: "12"
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
    - from:
        - podSelector: {matchLabels: {app: lb}}
      ports:
        - port: 80
        - protocol: UDP
          port: 53
          endPort: 54
"#,
    );
    assert_eq!(p.len(), 1);
    let p = &p[0];
    assert_eq!(p.full_name(), "shop/web");
    assert!(p.ingress.isolate, "Ingress is always a default policy type");
    assert!(
        !p.egress.isolate,
        "no egress rules: Egress is not defaulted"
    );
    let rule = &p.ingress.allow[0];
    assert_eq!(
        rule.ports.as_deref().unwrap(),
        &[
            PortRange {
                proto: PROTO_TCP,
                first: 80,
                last: 80
            },
            PortRange {
                proto: PROTO_UDP,
                first: 53,
                last: 54
            }
        ]
    );
    assert_eq!(
        rule.peers.as_deref().unwrap(),
        &[Peer::Endpoints {
            namespaces: NamespaceScope::Named("shop".into()),
            pods: LabelSelector {
                match_labels: [("app".into(), "lb".into())].into(),
                match_expressions: vec![],
            }
        }]
    );
}

#[test]
fn several_documents_and_json() {
    let p = parse(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec: {podSelector: {}}\n---\n# a comment\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b}\nspec:\n  podSelector: {}\n  egress: [{}]\n---\n",
    );
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].namespace, "default");
    assert!(p[1].egress.isolate && p[1].ingress.isolate);
    let json = r#"{
	"apiVersion": "hypha.dev/v1",
	"kind": "HyphaNetworkPolicy",
	"metadata": {"name": "j", "namespace": "x"},
	"spec": {"endpointSelector": {}, "auditMode": true,
	         "egress": [{"toCIDR": ["192.0.2.0/24"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]}
}"#;
    let p = parse_file("j.json", json).unwrap();
    assert!(p[0].audit && p[0].egress.isolate && !p[0].ingress.isolate);
}

#[test]
fn errors_name_the_file_the_document_the_line_and_the_field() {
    let e = parse_err(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec: {podSelector: {}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b}\nspec:\n  podSelector: {}\n  ingress:\n    - fromm: []\n",
    );
    assert!(e.starts_with("test.yaml: document 2: "), "{e}");
    assert!(e.contains("unknown field `fromm`"), "{e}");
    assert!(e.contains("line 12"), "{e}");
    assert!(e.contains("spec.ingress[0]"), "{e}");

    let k8s = |rule: &str| {
        parse_err(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: a}}\nspec:\n  podSelector: {{}}\n  ingress:\n    - {rule}\n"
        ))
    };
    let e = k8s("ports: [{port: Http}]");
    assert!(
        e.contains("\"Http\" is not a valid port name") && e.contains("line 7"),
        "{e}"
    );
    for bad in [
        "-http",
        "http-",
        "ht--tp",
        "123-456",
        "a-very-long-port-name",
    ] {
        let e = k8s(&format!("ports: [{{port: {bad}}}]"));
        assert!(e.contains("is not a valid port name"), "{bad}: {e}");
    }
    let e = k8s("ports: [{port: http, endPort: 90}]");
    assert!(e.contains("endPort needs a numeric port"), "{e}");
    let e = k8s("ports: [{port: \"80\"}]");
    assert!(e.contains("write the number without quotes"), "{e}");
    let e = k8s("ports: [{port: 0}]");
    assert!(e.contains("port 0 is out of range"), "{e}");
    let e = k8s("ports: [{port: 70000}]");
    assert!(e.contains("port 70000 is out of range"), "{e}");
    let e = k8s("ports: [{port: 80, endPort: 79}]");
    assert!(
        e.contains("spec.ingress[0].ports[0]: endPort 79 is below port 80"),
        "{e}"
    );
    let e = k8s("ports: [{endPort: 79}]");
    assert!(e.contains("endPort needs port"), "{e}");
    let e = k8s("ports: [{port: 80, protocol: ICMP}]");
    assert!(e.contains("ICMP"), "{e}");
    let e = k8s("from: [{ipBlock: {cidr: 10.0.0.1/8}}]");
    assert!(e.contains("host bits set; did you mean 10.0.0.0/8"), "{e}");
    let e = k8s("from: [{ipBlock: {cidr: 10.0.0.0/33}}]");
    assert!(e.contains("not a valid CIDR"), "{e}");
    let e = k8s("from: [{ipBlock: {cidr: 'fd00::1/64'}}]");
    assert!(e.contains("host bits set; did you mean fd00::/64"), "{e}");
    let e = k8s("from: [{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/64']}}]");
    assert!(
        e.contains("spec.ingress[0].from[0]: except fd00::/64 is IPv6 but cidr 10.0.0.0/8 is IPv4"),
        "{e}"
    );
    let e = k8s("from: [{ipBlock: {cidr: 'fd00::/8', except: [10.0.0.0/8]}}]");
    assert!(
        e.contains("except 10.0.0.0/8 is IPv4 but cidr fd00::/8 is IPv6"),
        "{e}"
    );
    let e = k8s("from: [{ipBlock: {cidr: 'fd00::/64', except: ['fd01::/80']}}]");
    assert!(
        e.contains("except fd01::/80 is not a strict subset of fd00::/64"),
        "{e}"
    );
    let e = k8s("from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]");
    assert!(
        e.contains("spec.ingress[0].from[0]: except 192.168.0.0/16 is not a strict subset"),
        "{e}"
    );
    let e = k8s("from: [{}]");
    assert!(e.contains("a peer needs podSelector"), "{e}");
    let e = k8s("from: [{podSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}]");
    assert!(e.contains("cannot be combined"), "{e}");
    let e = k8s("from: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]");
    assert!(
        e.contains("spec.ingress[0].from[0].podSelector.matchExpressions[0]"),
        "{e}"
    );

    let e = parse_err("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n");
    assert!(e.contains("kind ConfigMap (v1) is not a policy"), "{e}");
    let e = parse_err(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: Bad_Name}\nspec: {}\n",
    );
    assert!(e.contains("metadata.name \"Bad_Name\""), "{e}");
    let e = parse_err(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\n",
    );
    assert!(e.contains("default/a is defined twice"), "{e}");
    let e = parse_err("key: [unclosed\n");
    assert!(e.starts_with("test.yaml: "), "{e}");
}

#[test]
fn hypha_policy_parses_in_ciliums_shape() {
    let p = parse(
        r#"
apiVersion: hypha.dev/v1
kind: HyphaNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
    - fromEndpoints:
        - matchLabels: {k8s:app: web}
        - matchLabels: {k8s:io.kubernetes.pod.namespace: monitoring}
      toPorts:
        - ports: [{port: "8080", protocol: TCP}, {port: "9000", endPort: 9001}]
    - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
      icmps: [{fields: [{type: 8, family: IPv4}]}]
  egressDeny:
    - toCIDR: [192.0.2.7]
"#,
    );
    let p = &p[0];
    assert!(
        p.ingress.isolate && !p.egress.isolate,
        "deny alone does not isolate"
    );
    let r = &p.ingress.allow[0];
    let peers = r.peers.as_deref().unwrap();
    assert_eq!(
        peers[1],
        Peer::Endpoints {
            namespaces: NamespaceScope::Selected(LabelSelector {
                match_labels: [(NAMESPACE_NAME_LABEL.into(), "monitoring".into())].into(),
                match_expressions: vec![]
            }),
            pods: LabelSelector::default(),
        }
    );
    // ANY without a protocol: TCP, UDP and SCTP.
    assert_eq!(r.ports.as_ref().unwrap().len(), 1 + 3);
    assert_eq!(
        p.egress.deny[0].peers.as_deref().unwrap(),
        &[Peer::Cidr {
            net: "192.0.2.7/32".parse().unwrap(),
            except: vec![]
        }]
    );

    let hy = |spec: &str| {
        parse_err(&format!(
            "apiVersion: hypha.dev/v1\nkind: HyphaNetworkPolicy\nmetadata: {{name: a}}\nspec:\n  endpointSelector: {{}}\n{spec}"
        ))
    };
    let e = hy("  ingress: [{toPorts: [{ports: [{port: \"http\"}]}]}]\n");
    assert!(e.contains("named port \"http\""), "{e}");
    let e = hy("  ingress: [{toPorts: [{ports: [{port: \"80\"}], rules: {http: []}}]}]\n");
    assert!(e.contains("unknown field `rules`"), "{e}");
    let e = hy("  ingress: [{fromCIDR: ['fd00::1/64']}]\n");
    assert!(e.contains("host bits set; did you mean fd00::/64"), "{e}");
    let e = hy("  ingress: [{fromCIDRSet: [{cidr: 'fd00::/64', except: [10.0.0.0/8]}]}]\n");
    assert!(
        e.contains(
            "ingress[0].fromCIDRSet[0]: except 10.0.0.0/8 is IPv4 but cidr fd00::/64 is IPv6"
        ),
        "{e}"
    );
    let e = hy("  auditMode: yes please\n");
    assert!(e.contains("auditMode"), "{e}");
}

// ------------------------------------------------------------------ compiling

fn k8s(name: &str, ns: &str, spec: &str) -> Policy {
    let yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    );
    parse(&yaml).remove(0)
}

fn hypha(name: &str, ns: &str, spec: &str) -> Policy {
    let yaml = format!(
        "apiVersion: hypha.dev/v1\nkind: HyphaNetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    );
    parse(&yaml).remove(0)
}

#[test]
fn unselected_endpoints_enforce_nothing() {
    let w = World::new(vec![ep(2, "default", &[("app", "web")])]);
    let c = w.compile(&[]);
    assert_eq!(c.endpoint_flags[&2], 0);
    assert!(c.entries.is_empty());
    // The ipcache still knows the world, the host and the endpoint.
    assert_eq!(c.ipcache[&net("0.0.0.0/0")], IDENTITY_WORLD);
    assert_eq!(c.ipcache[&net("::/0")], IDENTITY_WORLD6);
    assert_eq!(c.ipcache[&prefix(HOST)], IDENTITY_HOST);
    assert!(identity_of(&c, &w.endpoints[0]) >= hypha_common::IDENTITY_FIRST_LABELS);
}

#[test]
fn empty_pod_selector_isolates_every_pod_of_its_namespace_only() {
    let w = World::new(vec![
        ep(2, "default", &[("app", "web")]),
        ep(3, "default", &[("app", "db")]),
        ep(4, "other", &[("app", "web")]),
    ]);
    let deny_all = k8s("deny", "default", "  podSelector: {}\n");
    let c = w.compile(&[deny_all]);
    assert_eq!(c.endpoint_flags[&2], ENDPOINT_F_INGRESS_POLICY);
    assert_eq!(c.endpoint_flags[&3], ENDPOINT_F_INGRESS_POLICY);
    assert_eq!(
        c.endpoint_flags[&4], 0,
        "a policy reaches its own namespace only"
    );
    assert!(allowed(&c, 2, DIR_INGRESS).is_empty());
    // The host may always reach its pods.
    assert!(c.entries.contains_key(&PolicyKey {
        endpoint_id: 2,
        identity: IDENTITY_HOST,
        dport: 0,
        proto: 0,
        direction: DIR_INGRESS
    }));

    let allow_all = k8s("all", "default", "  podSelector: {}\n  ingress: [{}]\n");
    let c = w.compile(&[allow_all]);
    assert_eq!(
        allowed(&c, 2, DIR_INGRESS),
        BTreeSet::from([(IDENTITY_ANY, 0, 0)])
    );
}

#[test]
fn pod_selector_peers_stay_in_the_policys_namespace() {
    let w = World::new(vec![
        ep(2, "a", &[("app", "db")]),
        ep(3, "a", &[("app", "web")]),
        ep(4, "b", &[("app", "web")]),
    ]);
    let p = k8s(
        "db",
        "a",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n",
    );
    let c = w.compile(&[p]);
    let web_a = identity_of(&c, &w.endpoints[1]);
    let web_b = identity_of(&c, &w.endpoints[2]);
    assert_ne!(
        web_a, web_b,
        "same labels, other namespace: another identity"
    );
    assert_eq!(
        allowed(&c, 2, DIR_INGRESS),
        BTreeSet::from([tcp(web_a, 5432)])
    );
    assert_eq!(c.endpoint_flags[&3], 0);
}

#[test]
fn namespace_and_pod_selector_in_one_peer_and_in_two() {
    let mut w = World::new(vec![
        ep(2, "a", &[("app", "db")]),
        ep(3, "a", &[("app", "web")]),
        ep(4, "b", &[("app", "web")]),
        ep(5, "b", &[("app", "batch")]),
        ep(6, "c", &[("app", "web")]),
    ]);
    w.namespaces
        .insert("b".into(), [("team".to_owned(), "shop".to_owned())].into());
    let one = k8s(
        "one",
        "a",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n    - from:\n        - namespaceSelector: {matchLabels: {team: shop}}\n          podSelector: {matchLabels: {app: web}}\n",
    );
    let c = w.compile(&[one]);
    let id = |i: usize, c: &Compiled| identity_of(c, &w.endpoints[i]);
    assert_eq!(
        allowed(&c, 2, DIR_INGRESS),
        BTreeSet::from([(id(2, &c), 0, 0)]),
        "AND: web pods in team=shop namespaces"
    );
    let two = k8s(
        "two",
        "a",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n    - from:\n        - namespaceSelector: {matchLabels: {team: shop}}\n        - podSelector: {matchLabels: {app: web}}\n",
    );
    let c = w.compile(&[two]);
    assert_eq!(
        allowed(&c, 2, DIR_INGRESS),
        BTreeSet::from([(id(1, &c), 0, 0), (id(2, &c), 0, 0), (id(3, &c), 0, 0)]),
        "OR: everything in b, and web pods of a"
    );
    // Namespaces carry their name as a label.
    let by_name = k8s(
        "byname",
        "a",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: c}}}]}]\n",
    );
    let c = w.compile(&[by_name]);
    assert_eq!(
        allowed(&c, 2, DIR_INGRESS),
        BTreeSet::from([(id(4, &c), 0, 0)])
    );
    // An empty namespaceSelector: every pod of every namespace (not the world).
    let all_ns = k8s(
        "allns",
        "a",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n",
    );
    let c = w.compile(&[all_ns]);
    assert_eq!(allowed(&c, 2, DIR_INGRESS).len(), 5);
    assert!(!allowed(&c, 2, DIR_INGRESS).contains(&(IDENTITY_WORLD, 0, 0)));
}

#[test]
fn ip_block_covers_nested_prefixes_and_carves_out_excepts() {
    let w = World::new(vec![
        ep(2, "default", &[("app", "db")]),
        ep(3, "default", &[("app", "web")]),
    ]);
    let p = k8s(
        "cidr",
        "default",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n    - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.3/32, 10.9.0.0/16]}}]\n    - from: [{ipBlock: {cidr: 10.9.1.0/24}}]\n      ports: [{port: 22}]\n",
    );
    let c = w.compile(&[p]);
    let c8 = c.ipcache[&net("10.0.0.0/8")];
    let c16 = c.ipcache[&net("10.9.0.0/16")];
    let c24 = c.ipcache[&net("10.9.1.0/24")];
    assert!(c8 >= hypha_common::IDENTITY_FIRST_CIDR);
    let db = identity_of(&c, &w.endpoints[0]);
    let web = identity_of(&c, &w.endpoints[1]);
    let got = allowed(&c, 2, DIR_INGRESS);
    // 10/8 itself, the host and db's /32 inside it; not web (excepted), not 10.9/16 or
    // 10.9.1/24 (inside the excepted 10.9/16).
    assert!(got.contains(&(c8, 0, 0)));
    assert!(
        got.contains(&(IDENTITY_HOST, 0, 0))
            || c.entries.keys().any(|k| k.identity == IDENTITY_HOST)
    );
    assert!(got.contains(&(db, 0, 0)));
    assert!(!got.contains(&(web, 0, 0)));
    assert!(!got.contains(&(c16, 0, 0)));
    assert!(!got.contains(&(c24, 0, 0)));
    assert!(got.contains(&tcp(c24, 22)), "the second rule");
    // 0.0.0.0/0 without except covers every IPv4 identity, not IPv6's world; with ::/0
    // as well it covers every identity: the wildcard.
    let v4 = k8s(
        "any",
        "default",
        "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}]}]\n  policyTypes: [Egress]\n",
    );
    let c = w.compile(&[v4]);
    let got = allowed(&c, 2, DIR_EGRESS);
    assert!(
        got.contains(&(IDENTITY_WORLD, 0, 0)) && !got.contains(&(IDENTITY_WORLD6, 0, 0)),
        "{got:?}"
    );
    let any = k8s(
        "any",
        "default",
        "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}, {ipBlock: {cidr: '::/0'}}]}]\n  policyTypes: [Egress]\n",
    );
    let c = w.compile(&[any]);
    assert_eq!(
        allowed(&c, 2, DIR_EGRESS),
        BTreeSet::from([(IDENTITY_ANY, 0, 0)])
    );
    assert_eq!(
        c.endpoint_flags[&2], ENDPOINT_F_EGRESS_POLICY,
        "Egress only"
    );
}

#[test]
fn ports_ranges_and_protocols() {
    let w = World::new(vec![ep(2, "default", &[])]);
    let p = k8s(
        "ports",
        "default",
        "  podSelector: {}\n  ingress:\n    - ports:\n        - {port: 8000, endPort: 8003}\n        - {protocol: UDP}\n        - {protocol: UDP, port: 53}\n        - {protocol: SCTP, port: 1, endPort: 65535}\n",
    );
    let c = w.compile(&[p]);
    let got = allowed(&c, 2, DIR_INGRESS);
    let want: BTreeSet<_> = (8000..=8003)
        .map(|p| tcp(IDENTITY_ANY, p))
        .chain([(IDENTITY_ANY, PROTO_UDP, 0), (IDENTITY_ANY, PROTO_SCTP, 0)])
        .collect();
    assert_eq!(
        got, want,
        "UDP/53 folds into UDP/any; 1-65535 is the port wildcard"
    );
}

#[test]
fn egress_policy_types_defaulting() {
    let w = World::new(vec![
        ep(2, "default", &[("app", "a")]),
        ep(3, "default", &[("app", "b")]),
    ]);
    // egress rules without policyTypes: Ingress and Egress.
    let p = k8s(
        "e",
        "default",
        "  podSelector: {matchLabels: {app: a}}\n  egress: [{to: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}]\n",
    );
    let c = w.compile(&[p]);
    let b = identity_of(&c, &w.endpoints[1]);
    assert_eq!(
        c.endpoint_flags[&2],
        ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_EGRESS_POLICY
    );
    assert_eq!(allowed(&c, 2, DIR_EGRESS), BTreeSet::from([tcp(b, 80)]));
    assert!(allowed(&c, 2, DIR_INGRESS).is_empty());
    // Replies to b need nothing here: b's side is unrestricted, and the datapath's
    // connection tracking passes replies of allowed flows.
    assert_eq!(c.endpoint_flags[&3], 0);
    // Explicit policyTypes: [Egress] leaves ingress open.
    let p = k8s(
        "e",
        "default",
        "  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress: []\n",
    );
    let c = w.compile(&[p]);
    assert_eq!(c.endpoint_flags[&2], ENDPOINT_F_EGRESS_POLICY);
    assert!(
        allowed(&c, 2, DIR_EGRESS).is_empty(),
        "egress: [] allows nothing"
    );
}

#[test]
fn policies_in_two_namespaces_add_up_per_endpoint() {
    let w = World::new(vec![
        ep(2, "a", &[("app", "x")]),
        ep(3, "b", &[("app", "x")]),
    ]);
    let pa = k8s(
        "p",
        "a",
        "  podSelector: {}\n  ingress: [{ports: [{port: 1}]}]\n",
    );
    let pb = k8s(
        "p",
        "b",
        "  podSelector: {}\n  ingress: [{ports: [{port: 2}]}]\n",
    );
    let pa2 = k8s(
        "q",
        "a",
        "  podSelector: {}\n  ingress: [{ports: [{port: 3}]}]\n",
    );
    let c = w.compile(&[pa, pb, pa2]);
    assert_eq!(
        allowed(&c, 2, DIR_INGRESS),
        BTreeSet::from([tcp(IDENTITY_ANY, 1), tcp(IDENTITY_ANY, 3)])
    );
    assert_eq!(
        allowed(&c, 3, DIR_INGRESS),
        BTreeSet::from([tcp(IDENTITY_ANY, 2)])
    );
    assert_eq!(c.policies.len(), 3);
    let names: BTreeSet<&str> = c.policies.values().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["a/p", "a/q", "b/p"]));
}

#[test]
fn deny_wins_over_allow_and_alone_does_not_isolate() {
    let w = World::new(vec![
        ep(2, "default", &[("app", "db")]),
        ep(3, "default", &[("app", "web")]),
    ]);
    let allow = hypha(
        "allow",
        "default",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{}]}]\n",
    );
    let deny = hypha(
        "deny",
        "default",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: \"5432\", protocol: TCP}]}]}]\n",
    );
    let c = w.compile(&[allow.clone(), deny.clone()]);
    let web = identity_of(&c, &w.endpoints[1]);
    assert_eq!(denied(&c, 2, DIR_INGRESS), BTreeSet::from([tcp(web, 5432)]));
    assert!(allowed(&c, 2, DIR_INGRESS).contains(&(web, 0, 0)));
    let deny_id = c.identities.policy_id("default/deny").unwrap();
    let e = c
        .entries
        .iter()
        .find(|(_, e)| e.action == POLICY_DENY)
        .unwrap()
        .1;
    assert_eq!(e.policy_id, deny_id);
    // The same key from an allow and a deny: the deny.
    let allow_exact = hypha(
        "exact",
        "default",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: \"5432\", protocol: TCP}]}]}]\n",
    );
    let c = w.compile(&[allow_exact, deny.clone()]);
    let key = PolicyKey {
        endpoint_id: 2,
        identity: web,
        dport: 5432,
        proto: PROTO_TCP,
        direction: DIR_INGRESS,
    };
    assert_eq!(c.entries[&key].action, POLICY_DENY);
    // Deny alone: the endpoint checks policy, and everything else passes.
    let c = w.compile(&[deny]);
    assert_eq!(c.endpoint_flags[&2], ENDPOINT_F_INGRESS_POLICY);
    assert!(allowed(&c, 2, DIR_INGRESS).contains(&(IDENTITY_ANY, 0, 0)));
}

#[test]
fn audit_mode_flags_entries_and_endpoints() {
    let w = World::new(vec![ep(2, "default", &[("app", "db")])]);
    let audit = hypha(
        "audit",
        "default",
        "  endpointSelector: {}\n  auditMode: true\n  ingress: [{toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]}]\n",
    );
    let c = w.compile(std::slice::from_ref(&audit));
    assert_eq!(
        c.endpoint_flags[&2],
        ENDPOINT_F_INGRESS_POLICY | ENDPOINT_F_INGRESS_AUDIT
    );
    let e = c.entries.values().find(|e| e.policy_id != 0).unwrap();
    assert_eq!(e.flags, POLICY_F_AUDIT);
    // With an enforcing policy beside it, the endpoint enforces, and the audit policy's
    // allows do not let through what the enforcing one drops.
    let enforce = k8s(
        "enforce",
        "default",
        "  podSelector: {}\n  ingress: [{ports: [{port: 443}]}]\n",
    );
    let c = w.compile(&[audit, enforce]);
    assert_eq!(c.endpoint_flags[&2], ENDPOINT_F_INGRESS_POLICY);
    assert_eq!(
        allowed(&c, 2, DIR_INGRESS),
        BTreeSet::from([tcp(IDENTITY_ANY, 443)])
    );
}

#[test]
fn entities_and_cilium_namespace_keys() {
    let mut w = World::new(vec![
        ep(2, "a", &[("app", "x")]),
        ep(3, "b", &[("app", "y")]),
    ]);
    w.namespaces
        .insert("b".into(), [("env".to_owned(), "prod".to_owned())].into());
    let p = hypha(
        "p",
        "a",
        "  endpointSelector: {}\n  egress:\n    - toEntities: [host]\n    - toEndpoints: [{matchLabels: {k8s:io.cilium.k8s.namespace.labels.env: prod}}]\n    - toEntities: [world]\n      toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n",
    );
    let c = w.compile(&[p]);
    let y = identity_of(&c, &w.endpoints[1]);
    assert_eq!(
        allowed(&c, 2, DIR_EGRESS),
        BTreeSet::from([
            (IDENTITY_HOST, 0, 0),
            (y, 0, 0),
            tcp(IDENTITY_WORLD, 443),
            tcp(IDENTITY_WORLD6, 443)
        ]),
        "world is both families' worlds"
    );
}

#[test]
fn identities_are_shared_and_stable_across_recompiles() {
    let w = World::new(vec![
        ep(2, "default", &[("app", "web")]),
        ep(3, "default", &[("app", "web")]),
    ]);
    let c = w.compile(&[]);
    assert_eq!(
        identity_of(&c, &w.endpoints[0]),
        identity_of(&c, &w.endpoints[1])
    );
    let again = compile(
        &[],
        &w.endpoints,
        &w.namespaces,
        &c.identities,
        &[HOST.into()],
        &[],
    )
    .unwrap();
    assert_eq!(again, c);
}

#[test]
fn capacity_is_refused_with_a_clear_error() {
    let eps: Vec<PolicyEndpoint> = (2..12).map(|i| ep(i, "default", &[])).collect();
    let p = k8s(
        "big",
        "default",
        "  podSelector: {}\n  ingress: [{ports: [{port: 1, endPort: 40000}]}]\n",
    );
    let err = compile(
        &[p],
        &eps,
        &BTreeMap::new(),
        &IdentityAllocator::default(),
        &[HOST.into()],
        &[],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            PolicyError::Capacity {
                map: "hypha_policy",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("262144"), "{err}");
}

#[test]
fn diff_is_minimal_and_round_trips() {
    let w = World::new(vec![
        ep(2, "default", &[("app", "db")]),
        ep(3, "default", &[("app", "web")]),
    ]);
    let p1 = k8s(
        "p",
        "default",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: 80}, {port: 81}]}]\n",
    );
    let p2 = k8s(
        "p",
        "default",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: 81}, {port: 82}]}]\n",
    );
    let empty = w.compile(&[]);
    let c1 = w.compile(&[p1]);
    let c2 = w.compile(&[p2]);
    let d = diff(&c1, &c2);
    assert_eq!(d.entries_set.len(), 1, "{d:?}");
    assert_eq!(d.entries_set[0].0.dport, 82);
    assert_eq!(d.entries_del.len(), 1);
    assert_eq!(d.entries_del[0].dport, 80);
    assert!(d.flags_set.is_empty() && d.ipcache_set.is_empty() && d.ipcache_del.is_empty());
    assert!(diff(&c2, &c2).is_empty());
    let d = diff(&empty, &c1);
    assert_eq!(d.flags_set, vec![(2, ENDPOINT_F_INGRESS_POLICY)]);
    let d = diff(&c1, &empty);
    assert_eq!(d.flags_set, vec![(2, 0)]);
    assert_eq!(d.entries_del.len(), c1.entries.len());
    // Applying a diff to the old maps gives the new ones.
    let mut maps = c1.entries.clone();
    let d = diff(&c1, &c2);
    let (adds, dels) = d.clone().split();
    assert_eq!(adds.entries_set, d.entries_set);
    assert_eq!(dels.entries_del, d.entries_del);
    maps.extend(d.entries_set.iter().copied());
    for k in &d.entries_del {
        maps.remove(k);
    }
    assert_eq!(maps, c2.entries);
}

// ------------------------------------------------------------------ IPv6

/// An endpoint `id` with both families: 10.244.0.<id> and fd00:10:244::<id>.
fn dual(id: u32, ns: &str, labels: &[(&str, &str)]) -> PolicyEndpoint {
    ep(id, ns, labels).with_address(v6(id).into())
}

fn v6(id: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, id as u16)
}

#[test]
fn hypha_cidrs_and_icmps_take_ipv6() {
    let p = parse(
        r#"
apiVersion: hypha.dev/v1
kind: HyphaNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  endpointSelector: {}
  ingress:
    - fromCIDRSet: [{cidr: 'fd00:10::/32', except: ['fd00:10:1::/48']}]
      icmps: [{fields: [{type: 128, family: IPv6}, {type: 8}]}]
  egress:
    - toCIDR: ['2001:db8::7', 'fd00::/8']
"#,
    );
    let p = &p[0];
    let r = &p.ingress.allow[0];
    assert_eq!(
        r.peers.as_deref().unwrap(),
        &[Peer::Cidr {
            net: net("fd00:10::/32"),
            except: vec![net("fd00:10:1::/48")]
        }]
    );
    // One ICMP of each family named; types are not matched.
    let protos: Vec<u8> = r.ports.as_ref().unwrap().iter().map(|p| p.proto).collect();
    assert_eq!(protos, vec![PROTO_ICMPV6, PROTO_ICMP]);
    assert_eq!(
        p.egress.allow[0].peers.as_deref().unwrap(),
        &[
            Peer::Cidr {
                net: net("2001:db8::7/128"),
                except: vec![]
            },
            Peer::Cidr {
                net: net("fd00::/8"),
                except: vec![]
            }
        ],
        "a bare IPv6 address is its /128"
    );
}

#[test]
fn an_ipv6_ip_block_with_except_gets_cidr_identities_and_entries_of_its_family_only() {
    let w = World::new(vec![
        dual(2, "default", &[("app", "db")]),
        dual(3, "default", &[("app", "web")]),
        ep(4, "default", &[("app", "v4only")]),
    ]);
    let p = k8s(
        "cidr6",
        "default",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n    - from: [{ipBlock: {cidr: 'fd00::/8', except: ['fd00:10:244::3/128', 'fd00:9::/32']}}]\n      ports: [{port: 443}]\n",
    );
    let c = w.compile(&[p]);
    // The CIDR and its holes have identities in the ipcache, as IPv6 prefixes.
    let c8 = c.ipcache[&net("fd00::/8")];
    let hole = c.ipcache[&net("fd00:9::/32")];
    assert!(c8 >= hypha_common::IDENTITY_FIRST_CIDR && hole >= hypha_common::IDENTITY_FIRST_CIDR);
    assert_ne!(c8, hole);
    // web's /128 is excepted but keeps its label identity (its /32 too).
    let web = identity_of(&c, &w.endpoints[1]);
    assert_eq!(c.ipcache[&net("fd00:10:244::3/128")], web);
    let db = identity_of(&c, &w.endpoints[0]);
    let v4only = identity_of(&c, &w.endpoints[2]);
    let got = allowed(&c, 2, DIR_INGRESS);
    // fd00::/8 itself and db's /128 inside it; not web (excepted), not the hole, not
    // the IPv4-only endpoint, not either world, not the IPv4 host.
    assert_eq!(got, BTreeSet::from([tcp(c8, 443), tcp(db, 443)]), "{got:?}");
    assert!(!got.contains(&tcp(web, 443)) && !got.contains(&tcp(hole, 443)));
    assert!(!got.contains(&tcp(v4only, 443)));
    // The ipcache holds every endpoint address of both families, and both worlds.
    for e in &w.endpoints {
        for a in e.addresses() {
            assert!(c.ipcache.contains_key(&prefix(a)), "{a}");
        }
    }
    assert_eq!(c.ipcache[&net("::/0")], IDENTITY_WORLD6);
    assert_eq!(c.ipcache[&net("0.0.0.0/0")], IDENTITY_WORLD);
}

#[test]
fn a_selector_rule_allows_both_families_of_a_peer_through_its_one_identity() {
    let w = World::new(vec![
        dual(2, "default", &[("app", "db")]),
        dual(3, "default", &[("app", "web")]),
    ]);
    let p = k8s(
        "web-to-db",
        "default",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n",
    );
    let c = w.compile(&[p]);
    let web = &w.endpoints[1];
    let id = c.ipcache[&prefix(web.address.unwrap())];
    assert_eq!(
        c.ipcache[&prefix(web.address6.unwrap())],
        id,
        "the /32 and the /128 are one identity"
    );
    assert_eq!(allowed(&c, 2, DIR_INGRESS), BTreeSet::from([tcp(id, 5432)]));
}

#[test]
fn world_covers_both_families_and_each_family_s_cidr_only_its_own() {
    let mut w = World::new(vec![dual(2, "default", &[("app", "db")])]);
    w.namespaces.clear();
    let world = hypha(
        "out",
        "default",
        "  endpointSelector: {}\n  egress: [{toEntities: [world]}]\n",
    );
    let c = w.compile(&[world]);
    let got = allowed(&c, 2, DIR_EGRESS);
    assert!(
        got.contains(&(IDENTITY_WORLD, 0, 0)) && got.contains(&(IDENTITY_WORLD6, 0, 0)),
        "{got:?}"
    );
    let v6_world = k8s(
        "v6",
        "default",
        "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: '::/0'}}]}]\n  policyTypes: [Egress]\n",
    );
    let c = w.compile(&[v6_world]);
    let got = allowed(&c, 2, DIR_EGRESS);
    assert!(
        got.contains(&(IDENTITY_WORLD6, 0, 0)) && !got.contains(&(IDENTITY_WORLD, 0, 0)),
        "::/0 allows no IPv4 world: {got:?}"
    );
    // The host's IPv6 addresses are its link-local ones (fe80::/10 is the host's), inside
    // ::/0 as the IPv4 gateway is inside 0.0.0.0/0.
    assert!(
        got.contains(&(IDENTITY_HOST, 0, 0)),
        "::/0 covers the host's link-local prefix: {got:?}"
    );
    let v6_global = k8s(
        "v6g",
        "default",
        "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: '2000::/3'}}]}]\n  policyTypes: [Egress]\n",
    );
    let got = allowed(&w.compile(&[v6_global]), 2, DIR_EGRESS);
    assert!(
        !got.contains(&(IDENTITY_HOST, 0, 0)) && !got.contains(&(IDENTITY_WORLD6, 0, 0)),
        "2000::/3 is neither the host nor the whole IPv6 world: {got:?}"
    );
}

#[test]
fn adding_and_removing_an_ipv6_cidr_diffs_its_prefixes_and_entries() {
    let w = World::new(vec![dual(2, "default", &[("app", "db")])]);
    let base = k8s(
        "p",
        "default",
        "  podSelector: {}\n  egress: [{to: [{podSelector: {}}]}]\n  policyTypes: [Egress]\n",
    );
    let with_cidr = k8s(
        "p",
        "default",
        "  podSelector: {}\n  egress: [{to: [{podSelector: {}}]}, {to: [{ipBlock: {cidr: '2001:db8::/32', except: ['2001:db8:1::/48']}}], ports: [{port: 53, protocol: UDP}]}]\n  policyTypes: [Egress]\n",
    );
    let c0 = w.compile(std::slice::from_ref(&base));
    let c1 = compile(
        std::slice::from_ref(&with_cidr),
        &w.endpoints,
        &w.namespaces,
        &c0.identities,
        &[HOST.into()],
        &[],
    )
    .unwrap();
    let cidr = c1.ipcache[&net("2001:db8::/32")];
    let hole = c1.ipcache[&net("2001:db8:1::/48")];
    let d = diff(&c0, &c1);
    let set: BTreeMap<IpNet, u32> = d.ipcache_set.iter().copied().collect();
    assert_eq!(
        set,
        BTreeMap::from([(net("2001:db8::/32"), cidr), (net("2001:db8:1::/48"), hole)])
    );
    assert!(d.ipcache_del.is_empty() && d.entries_del.is_empty() && d.flags_set.is_empty());
    let keys: Vec<(u32, u8, u16)> = d
        .entries_set
        .iter()
        .map(|(k, _)| (k.identity, k.proto, k.dport))
        .collect();
    assert_eq!(keys, vec![(cidr, PROTO_UDP, 53)]);
    // And back: the prefixes and the entry go, nothing else.
    let back = compile(
        std::slice::from_ref(&base),
        &w.endpoints,
        &w.namespaces,
        &c1.identities,
        &[HOST.into()],
        &[],
    )
    .unwrap();
    let d = diff(&c1, &back);
    assert_eq!(
        d.ipcache_del,
        vec![net("2001:db8::/32"), net("2001:db8:1::/48")]
    );
    assert_eq!(d.entries_del.len(), 1);
    assert!(d.ipcache_set.is_empty() && d.entries_set.is_empty());
}

#[test]
fn the_host_s_ipv6_address_is_the_host_identity() {
    let w = World::new(vec![dual(2, "default", &[])]);
    let host6: IpAddr = "fd00:10:244::1".parse().unwrap();
    let c = compile(
        &[],
        &w.endpoints,
        &w.namespaces,
        &IdentityAllocator::default(),
        &[HOST.into(), host6],
        &[],
    )
    .unwrap();
    assert_eq!(c.ipcache[&prefix(host6)], IDENTITY_HOST);
    assert_eq!(c.ipcache[&prefix(HOST)], IDENTITY_HOST);
}

// ------------------------------------------------------------------ other nodes

/// Node 1's underlay address and gateway, node 2's IPv6 router address.
fn remote_nodes() -> Vec<IpAddr> {
    vec![
        Ipv4Addr::new(172, 16, 0, 12).into(),
        Ipv4Addr::new(10, 244, 1, 1).into(),
        "fd00:10:244:2::1".parse().unwrap(),
    ]
}

/// Endpoint 2 (local, `app: db`), endpoint 3 (another node's, `app: web`), the
/// cluster's other nodes.
fn cluster_world() -> World {
    let mut remote = ep(3, "default", &[("app", "web")]).into_remote();
    remote.address = Some(Ipv4Addr::new(10, 244, 1, 7));
    let mut w = World::new(vec![ep(2, "default", &[("app", "db")]), remote]);
    w.remote_nodes = remote_nodes();
    w
}

#[test]
fn other_nodes_addresses_are_the_remote_node_identity_below_endpoints_and_host() {
    let mut w = cluster_world();
    let c = w.compile(&[]);
    for a in remote_nodes() {
        assert_eq!(c.ipcache[&prefix(a)], IDENTITY_REMOTE_NODE, "{a}");
    }
    // An address the host or an endpoint has stays theirs.
    w.remote_nodes.push(HOST.into());
    w.remote_nodes.push(Ipv4Addr::new(10, 244, 0, 2).into());
    let c = w.compile(&[]);
    assert_eq!(c.ipcache[&prefix(HOST)], IDENTITY_HOST);
    assert_eq!(
        c.ipcache[&prefix(Ipv4Addr::new(10, 244, 0, 2))],
        identity_of(&c, &w.endpoints[0])
    );
}

#[test]
fn remote_node_is_an_entity_and_part_of_cluster_but_not_of_world() {
    let p = parse(
        "apiVersion: hypha.dev/v1\nkind: HyphaNetworkPolicy\nmetadata: {name: n, namespace: default}\nspec:\n  endpointSelector: {}\n  ingress: [{fromEntities: [remote-node]}]\n",
    );
    assert_eq!(
        p[0].ingress.allow[0].peers,
        Some(vec![Peer::Entity(Entity::RemoteNode)])
    );
    let err = parse_err(
        "apiVersion: hypha.dev/v1\nkind: HyphaNetworkPolicy\nmetadata: {name: n, namespace: default}\nspec:\n  endpointSelector: {}\n  ingress: [{fromEntities: [remote_node]}]\n",
    );
    assert!(
        err.contains("remote_node") && err.contains("remote-node"),
        "{err}"
    );

    let w = cluster_world();
    let c = w.compile(&p);
    assert_eq!(
        allowed(&c, 2, DIR_INGRESS),
        BTreeSet::from([(IDENTITY_REMOTE_NODE, 0, 0)])
    );

    let cluster = hypha(
        "c",
        "default",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEntities: [cluster]}]\n",
    );
    let c = w.compile(&[cluster]);
    let local = identity_of(&c, &w.endpoints[0]);
    let remote = identity_of(&c, &w.endpoints[1]);
    assert_eq!(
        allowed(&c, 2, DIR_INGRESS),
        BTreeSet::from([
            (IDENTITY_HOST, 0, 0),
            (IDENTITY_REMOTE_NODE, 0, 0),
            (local, 0, 0),
            (remote, 0, 0),
        ]),
        "host, other nodes, this node's and other nodes' endpoints"
    );

    let world = hypha(
        "w",
        "default",
        "  endpointSelector: {matchLabels: {app: db}}\n  egress: [{toEntities: [world]}]\n",
    );
    let c = w.compile(&[world]);
    let got = allowed(&c, 2, DIR_EGRESS);
    assert!(got.contains(&(IDENTITY_WORLD, 0, 0)), "{got:?}");
    assert!(
        !got.contains(&(IDENTITY_REMOTE_NODE, 0, 0)) && !got.contains(&(remote, 0, 0)),
        "world holds neither other nodes nor their pods: {got:?}"
    );
}

#[test]
fn an_isolated_endpoint_implicitly_admits_its_own_host_only() {
    let w = cluster_world();
    let deny_all = k8s(
        "deny",
        "default",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    );
    let c = w.compile(&[deny_all]);
    let ingress: BTreeSet<u32> = c
        .entries
        .keys()
        .filter(|k| k.endpoint_id == 2 && k.direction == DIR_INGRESS)
        .map(|k| k.identity)
        .collect();
    assert_eq!(ingress, BTreeSet::from([IDENTITY_HOST]));

    // A CIDR holding other nodes' addresses covers them.
    let underlay = k8s(
        "underlay",
        "default",
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 172.16.0.0/16}}]}]\n",
    );
    let c = w.compile(&[underlay]);
    assert!(
        allowed(&c, 2, DIR_INGRESS).contains(&(IDENTITY_REMOTE_NODE, 0, 0)),
        "{:?}",
        allowed(&c, 2, DIR_INGRESS)
    );
}
