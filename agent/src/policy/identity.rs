//! Security identities and policy ids: numbers the datapath keys its maps by, allocated
//! by the agent and persisted with its state, so that they stay the same across
//! recompilations and agent restarts.
//!
//! - A label identity stands for one (namespace, labels) set: every endpoint with the
//!   same labels in the same namespace shares it. From [`IDENTITY_FIRST_LABELS`].
//! - A CIDR identity stands for one prefix a policy names, of either family. From
//!   [`IDENTITY_FIRST_CIDR`].
//! - A policy id stands for one policy (`namespace/name`), from 1; it indexes
//!   `hypha_policy_stats`.
//!
//! Numbers nobody uses any more are released; a released number is handed out again only
//! after the counter has gone round its whole range, so a number seldom changes meaning
//! while a counter or a monitor event still shows it.
//!
//! **Cluster mode** ([`IdentityAllocator::set_cluster`]): label identities are the
//! cluster store's, never invented here. The allocator keeps the numbers the store gave
//! ([`IdentityAllocator::assign`]) and a label set in use takes its assigned number; one
//! the store has not assigned is refused ([`PolicyError::Unassigned`]). CIDR identities
//! and policy ids stay local. The assignments are persisted with the allocator, so that
//! an agent restarted while the store is unreachable keeps its numbers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hypha_common::{IDENTITY_FIRST_CIDR, IDENTITY_FIRST_LABELS, MAX_POLICIES};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{Labels, PolicyError};

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    Labels {
        namespace: String,
        labels: Labels,
    },
    /// Persisted as the prefix's text (`"10.0.0.0/8"`, `"fd00::/8"`): what an agent from
    /// before IPv6 saved reads the same.
    Cidr(IpNet),
}

/// The persisted allocator.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Saved")]
pub struct IdentityAllocator {
    #[serde(default)]
    identities: BTreeMap<u32, IdentitySource>,
    #[serde(default)]
    policies: BTreeMap<u32, String>,
    /// Where the next searches start (0: at the start of the range).
    #[serde(default)]
    next_labels: u32,
    #[serde(default)]
    next_cidr: u32,
    #[serde(default)]
    next_policy: u32,
    /// Cluster mode: label identities come from the store (see the module's doc). Off in
    /// what a single node saves (and absent from it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cluster: bool,
    /// Cluster mode: the numbers the store gave label sets (whether in use here or not).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    assigned: BTreeMap<u32, IdentitySource>,
    /// `assigned` by label set (rebuilt when read back).
    #[serde(skip)]
    assigned_by: HashMap<(String, Labels), u32>,
}

/// What the allocator saves: itself without its index.
#[derive(Deserialize)]
struct Saved {
    #[serde(default)]
    identities: BTreeMap<u32, IdentitySource>,
    #[serde(default)]
    policies: BTreeMap<u32, String>,
    #[serde(default)]
    next_labels: u32,
    #[serde(default)]
    next_cidr: u32,
    #[serde(default)]
    next_policy: u32,
    #[serde(default)]
    cluster: bool,
    #[serde(default)]
    assigned: BTreeMap<u32, IdentitySource>,
}

impl From<Saved> for IdentityAllocator {
    fn from(s: Saved) -> Self {
        let assigned_by = s
            .assigned
            .iter()
            .filter_map(|(id, src)| label_key(src).map(|k| (k, *id)))
            .collect();
        Self {
            identities: s.identities,
            policies: s.policies,
            next_labels: s.next_labels,
            next_cidr: s.next_cidr,
            next_policy: s.next_policy,
            cluster: s.cluster,
            assigned: s.assigned,
            assigned_by,
        }
    }
}

fn label_key(src: &IdentitySource) -> Option<(String, Labels)> {
    match src {
        IdentitySource::Labels { namespace, labels } => Some((namespace.clone(), labels.clone())),
        IdentitySource::Cidr(_) => None,
    }
}

/// A label set, as errors show it: `namespace/{k=v,...}`.
pub fn describe_labels(namespace: &str, labels: &Labels) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{namespace}/{{{}}}", pairs.join(","))
}

impl IdentityAllocator {
    /// Keeps (or allocates) a number for everything wanted and releases the rest.
    pub fn sync(
        &mut self,
        labels: &BTreeSet<(String, Labels)>,
        cidrs: &BTreeSet<IpNet>,
        policies: &BTreeSet<String>,
    ) -> Result<(), PolicyError> {
        self.identities.retain(|_, s| match s {
            IdentitySource::Labels {
                namespace,
                labels: l,
            } => labels.contains(&(namespace.clone(), l.clone())),
            IdentitySource::Cidr(c) => cidrs.contains(c),
        });
        self.policies.retain(|_, name| policies.contains(name));
        let have: BTreeSet<IdentitySource> = self.identities.values().cloned().collect();
        for (namespace, l) in labels {
            let src = IdentitySource::Labels {
                namespace: namespace.clone(),
                labels: l.clone(),
            };
            if !have.contains(&src) {
                self.allocate(src)?;
            }
        }
        for c in cidrs {
            let src = IdentitySource::Cidr(*c);
            if !have.contains(&src) {
                let id = next_free(
                    &self.identities,
                    &mut self.next_cidr,
                    IDENTITY_FIRST_CIDR,
                    u32::MAX,
                )
                .ok_or(PolicyError::Exhausted {
                    what: "CIDR identities",
                    count: self.identities.len(),
                })?;
                self.identities.insert(id, src);
            }
        }
        let named: BTreeSet<&String> = self.policies.values().collect();
        let missing: Vec<String> = policies
            .iter()
            .filter(|p| !named.contains(p))
            .cloned()
            .collect();
        for p in missing {
            let id = next_free(&self.policies, &mut self.next_policy, 1, MAX_POLICIES).ok_or(
                PolicyError::Exhausted {
                    what: "policy ids",
                    count: self.policies.len(),
                },
            )?;
            self.policies.insert(id, p);
        }
        Ok(())
    }

    /// Allocates a number for `src` (not yet allocated), as [`Self::sync`] would.
    pub(super) fn allocate(&mut self, src: IdentitySource) -> Result<u32, PolicyError> {
        if self.cluster
            && let IdentitySource::Labels { namespace, labels } = &src
        {
            let unassigned = || PolicyError::Unassigned {
                labels: describe_labels(namespace, labels),
            };
            let id = *self
                .assigned_by
                .get(&(namespace.clone(), labels.clone()))
                .ok_or_else(unassigned)?;
            if self.identities.get(&id).is_some_and(|s| *s != src) {
                // `assign` never leaves a number with two label sets in use.
                return Err(unassigned());
            }
            self.identities.insert(id, src);
            return Ok(id);
        }
        let (next, first, end, what) = match src {
            IdentitySource::Labels { .. } => (
                &mut self.next_labels,
                IDENTITY_FIRST_LABELS,
                IDENTITY_FIRST_CIDR,
                "label identities",
            ),
            IdentitySource::Cidr(_) => (
                &mut self.next_cidr,
                IDENTITY_FIRST_CIDR,
                u32::MAX,
                "CIDR identities",
            ),
        };
        let id = next_free(&self.identities, next, first, end).ok_or(PolicyError::Exhausted {
            what,
            count: self.identities.len(),
        })?;
        self.identities.insert(id, src);
        Ok(id)
    }

    /// Allocates a policy id for `full_name` (not yet allocated), as [`Self::sync`] would.
    pub(super) fn allocate_policy(&mut self, full_name: &str) -> Result<u32, PolicyError> {
        let id = next_free(&self.policies, &mut self.next_policy, 1, MAX_POLICIES).ok_or(
            PolicyError::Exhausted {
                what: "policy ids",
                count: self.policies.len(),
            },
        )?;
        self.policies.insert(id, full_name.to_owned());
        Ok(id)
    }

    /// Cluster mode on or off (on: label identities are only what [`Self::assign`]
    /// gave).
    pub fn set_cluster(&mut self, on: bool) {
        self.cluster = on;
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Cluster mode: the store gave `(namespace, labels)` number `id`. The store wins: a
    /// different number these labels had, and other labels `id` stood for, are
    /// forgotten. Returns whether anything changed. Does not touch the identities in use
    /// (the engine checks those first: see `PolicyEngine::assign_identities`).
    pub fn assign(&mut self, namespace: &str, labels: &Labels, id: u32) -> bool {
        let key = (namespace.to_owned(), labels.clone());
        if self.assigned_by.get(&key) == Some(&id) {
            return false;
        }
        if let Some(old) = self.assigned_by.remove(&key) {
            self.assigned.remove(&old);
        }
        if let Some(other) = self.assigned.remove(&id).as_ref().and_then(label_key) {
            self.assigned_by.remove(&other);
        }
        self.assigned.insert(
            id,
            IdentitySource::Labels {
                namespace: key.0.clone(),
                labels: key.1.clone(),
            },
        );
        self.assigned_by.insert(key, id);
        true
    }

    /// Cluster mode: the store no longer has number `id`. Returns whether it was known.
    pub fn unassign(&mut self, id: u32) -> bool {
        match self.assigned.remove(&id) {
            Some(src) => {
                if let Some(k) = label_key(&src) {
                    self.assigned_by.remove(&k);
                }
                true
            }
            None => false,
        }
    }

    /// Cluster mode: the number the store gave `(namespace, labels)`, if any.
    pub fn assigned(&self, namespace: &str, labels: &Labels) -> Option<u32> {
        self.assigned_by
            .get(&(namespace.to_owned(), labels.clone()))
            .copied()
    }

    /// Cluster mode: every number the store gave, with its labels.
    pub fn assignments(&self) -> &BTreeMap<u32, IdentitySource> {
        &self.assigned
    }

    /// Releases identity `id`.
    pub(super) fn release(&mut self, id: u32) {
        self.identities.remove(&id);
    }

    /// Releases policy id `id`.
    pub(super) fn release_policy(&mut self, id: u32) {
        self.policies.remove(&id);
    }

    /// The identity of endpoints with `labels` in `namespace`, once synced.
    pub fn labels_identity(&self, namespace: &str, labels: &Labels) -> Option<u32> {
        self.identities.iter().find_map(|(id, s)| match s {
            IdentitySource::Labels {
                namespace: n,
                labels: l,
            } if n == namespace && l == labels => Some(*id),
            _ => None,
        })
    }

    /// The identities by what they stand for (for lookups in bulk).
    pub fn by_source(&self) -> BTreeMap<&IdentitySource, u32> {
        self.identities.iter().map(|(id, s)| (s, *id)).collect()
    }

    /// The id of policy `namespace/name`, once synced.
    pub fn policy_id(&self, full_name: &str) -> Option<u32> {
        self.policies
            .iter()
            .find_map(|(id, n)| (n == full_name).then_some(*id))
    }

    pub fn policies(&self) -> &BTreeMap<u32, String> {
        &self.policies
    }

    /// What identity `id` stands for, if it is allocated here.
    pub fn source(&self, id: u32) -> Option<&IdentitySource> {
        self.identities.get(&id)
    }
}

/// The first number in `[first, end)` not in `used`, searching from `*next` and wrapping
/// once; advances `*next` past it.
fn next_free<V>(used: &BTreeMap<u32, V>, next: &mut u32, first: u32, end: u32) -> Option<u32> {
    let start = if (first..end).contains(next) {
        *next
    } else {
        first
    };
    let found = (start..end)
        .chain(first..start)
        .find(|n| !used.contains_key(n))?;
    *next = if found + 1 >= end { first } else { found + 1 };
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[(&str, &[(&str, &str)])]) -> BTreeSet<(String, Labels)> {
        items
            .iter()
            .map(|(ns, l)| {
                (
                    (*ns).to_owned(),
                    l.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn identities_are_stable_and_released_numbers_are_not_reused_at_once() {
        let mut a = IdentityAllocator::default();
        let web = set(&[("default", &[("app", "web")])]);
        let both = set(&[
            ("default", &[("app", "web")]),
            ("default", &[("app", "db")]),
        ]);
        a.sync(&both, &BTreeSet::new(), &BTreeSet::new()).unwrap();
        let web_id = a
            .labels_identity("default", &web.first().unwrap().1)
            .unwrap();
        assert!(web_id >= IDENTITY_FIRST_LABELS);
        let db_labels: Labels = [("app".to_owned(), "db".to_owned())].into();
        let db_id = a.labels_identity("default", &db_labels).unwrap();
        assert_ne!(web_id, db_id);
        // Same set again: same numbers. Round trip through JSON (the state file).
        let mut a: IdentityAllocator =
            serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        a.sync(&both, &BTreeSet::new(), &BTreeSet::new()).unwrap();
        assert_eq!(a.labels_identity("default", &db_labels), Some(db_id));
        // db goes, then a new set comes: it does not get db's number.
        a.sync(&web, &BTreeSet::new(), &BTreeSet::new()).unwrap();
        assert_eq!(a.labels_identity("default", &db_labels), None);
        let other = set(&[("default", &[("app", "web")]), ("other", &[("app", "db")])]);
        a.sync(&other, &BTreeSet::new(), &BTreeSet::new()).unwrap();
        let moved = a.labels_identity("other", &db_labels).unwrap();
        assert_ne!(moved, db_id);
        assert_eq!(
            a.labels_identity("default", &web.first().unwrap().1),
            Some(web_id)
        );
    }

    #[test]
    fn cidrs_and_policies_have_their_own_ranges() {
        let mut a = IdentityAllocator::default();
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        let net6: IpNet = "fd00::/8".parse().unwrap();
        a.sync(
            &BTreeSet::new(),
            &BTreeSet::from([net, net6]),
            &BTreeSet::from(["default/p".to_owned()]),
        )
        .unwrap();
        let id = a.by_source()[&IdentitySource::Cidr(net)];
        let id6 = a.by_source()[&IdentitySource::Cidr(net6)];
        assert!(id >= IDENTITY_FIRST_CIDR && id6 >= IDENTITY_FIRST_CIDR && id != id6);
        assert_eq!(a.policy_id("default/p"), Some(1));
    }

    #[test]
    fn cidr_identities_an_ipv4_only_agent_saved_read_the_same() {
        // As an agent from before IPv6 persisted one (its prefix as text).
        let saved = r#"{"identities":{"16777216":{"cidr":"10.0.0.0/8"}},"next_cidr":16777217}"#;
        let a: IdentityAllocator = serde_json::from_str(saved).expect("old allocator");
        assert_eq!(
            a.by_source()[&IdentitySource::Cidr("10.0.0.0/8".parse().unwrap())],
            IDENTITY_FIRST_CIDR
        );
        let mut b = IdentityAllocator::default();
        b.sync(
            &BTreeSet::new(),
            &BTreeSet::from(["fd00:1::/64".parse().unwrap()]),
            &BTreeSet::new(),
        )
        .unwrap();
        let text = serde_json::to_string(&b).unwrap();
        assert!(text.contains(r#"{"cidr":"fd00:1::/64"}"#), "{text}");
        assert_eq!(serde_json::from_str::<IdentityAllocator>(&text).unwrap(), b);
    }

    #[test]
    fn next_free_wraps() {
        let used: BTreeMap<u32, ()> = [(1, ()), (3, ())].into();
        let mut next = 3;
        assert_eq!(next_free(&used, &mut next, 1, 4), Some(2));
        assert_eq!(next, 3);
        let full: BTreeMap<u32, ()> = [(1, ()), (2, ()), (3, ())].into();
        assert_eq!(next_free(&full, &mut next, 1, 4), None);
    }
}
