//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), as both policy kinds
//! write them, and their matching against a set of labels.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels of an endpoint or a namespace.
pub type Labels = BTreeMap<String, String>;

/// A label selector. The empty selector (`{}`) selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy every term (the terms are ANDed, as in Kubernetes).
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Checks what serde cannot: values where the operator needs them and only there,
    /// label keys that are not empty. `path` names the selector in error messages.
    pub fn validate(&self, path: &str) -> Result<(), String> {
        for (k, v) in &self.match_labels {
            validate_key(k).map_err(|e| format!("{path}.matchLabels: {e}"))?;
            validate_value(v).map_err(|e| format!("{path}.matchLabels.{k}: {e}"))?;
        }
        for (i, r) in self.match_expressions.iter().enumerate() {
            let here = format!("{path}.matchExpressions[{i}]");
            validate_key(&r.key).map_err(|e| format!("{here}.key: {e}"))?;
            match r.operator {
                Operator::In | Operator::NotIn if r.values.is_empty() => {
                    return Err(format!(
                        "{here}: operator {:?} needs at least one value",
                        r.operator
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                    return Err(format!("{here}: operator {:?} takes no values", r.operator));
                }
                _ => {}
            }
            for v in &r.values {
                validate_value(v).map_err(|e| format!("{here}.values: {e}"))?;
            }
        }
        Ok(())
    }

    /// A readable form, `app=web,tier in (a,b)`; `{}` for the empty selector.
    pub fn describe(&self) -> String {
        let mut terms: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            terms.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        if terms.is_empty() {
            "{}".into()
        } else {
            terms.join(",")
        }
    }
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // As in Kubernetes: a missing key satisfies NotIn.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("a label key is empty".into());
    }
    if key.len() > 317 || key.contains(|c: char| c.is_whitespace() || c == ',' || c == '=') {
        return Err(format!("{key:?} is not a valid label key"));
    }
    Ok(())
}

fn validate_value(value: &str) -> Result<(), String> {
    if value.len() > 63 || value.contains(|c: char| c.is_whitespace() || c == ',') {
        return Err(format!(
            "{value:?} is not a valid label value (at most 63 characters, no spaces or commas)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn sel(yaml: &str) -> LabelSelector {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn empty_selects_everything_and_terms_are_anded() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        let s = sel(
            "matchLabels: {app: web}\nmatchExpressions: [{key: tier, operator: In, values: [a, b]}]",
        );
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "b")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c")])));
        assert!(!s.matches(&labels(&[("tier", "a")])));
        assert_eq!(s.describe(), "app=web,tier in (a,b)");
    }

    #[test]
    fn operators_follow_kubernetes() {
        let notin = sel("matchExpressions: [{key: env, operator: NotIn, values: [prod]}]");
        assert!(notin.matches(&labels(&[])), "missing key satisfies NotIn");
        assert!(!notin.matches(&labels(&[("env", "prod")])));
        let exists = sel("matchExpressions: [{key: env, operator: Exists}]");
        assert!(exists.matches(&labels(&[("env", "")])));
        assert!(!exists.matches(&labels(&[])));
        let dne = sel("matchExpressions: [{key: env, operator: DoesNotExist}]");
        assert!(dne.matches(&labels(&[])));
    }

    #[test]
    fn invalid_selectors_are_named() {
        let e = sel("matchExpressions: [{key: env, operator: In}]")
            .validate("spec.podSelector")
            .unwrap_err();
        assert!(
            e.contains("spec.podSelector.matchExpressions[0]") && e.contains("needs at least one"),
            "{e}"
        );
        let e = sel("matchExpressions: [{key: env, operator: Exists, values: [x]}]")
            .validate("s")
            .unwrap_err();
        assert!(e.contains("takes no values"), "{e}");
        let e = serde_yaml_ng::from_str::<LabelSelector>(
            "matchExpressions: [{key: env, operator: Equals, values: [x]}]",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Equals"), "{e}");
    }
}
