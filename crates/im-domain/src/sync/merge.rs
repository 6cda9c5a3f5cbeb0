//! The three-way comparison of one record's mapped fields: the provider's version, the
//! platform's version and the last synced state. A field changed on one side only goes to the
//! other side; a field changed on both sides goes to the task's conflict policy; a field equal
//! on both sides writes nothing (which is how the sync's own writes, coming back, are not echoed).

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::execution::Side;
use super::task::{ConflictPolicy, Direction, FieldMapping};

/// One side's version of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Version<'a> {
    /// The whole record as that side has it.
    pub record: &'a Value,
    pub updated_at: Option<OffsetDateTime>,
}

/// What to do with one record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Fields to write to the platform, by platform pointer (`None`: nothing to write).
    pub to_platform: Option<Map<String, Value>>,
    /// Fields to write to the provider, by provider pointer.
    pub to_provider: Option<Map<String, Value>>,
    /// Fields changed on both sides under the `manual` policy (platform pointers), with the
    /// base, provider and platform values, for a [`super::SyncConflict`].
    pub conflicts: Vec<String>,
    /// How many fields were changed on both sides (whatever the policy).
    pub contested: usize,
    /// The mapped fields as they will be once the writes are made (the next last synced state),
    /// by platform pointer. A field in conflict keeps its base value.
    pub synced: Map<String, Value>,
}

impl Decision {
    pub fn writes_nothing(&self) -> bool {
        self.to_platform.is_none() && self.to_provider.is_none()
    }
}

/// The mapped fields of a side's record, by platform pointer (a missing field is `null`).
pub fn extract(mapping: &[FieldMapping], record: &Value, side: Side) -> Map<String, Value> {
    mapping
        .iter()
        .map(|m| {
            let pointer = if side == Side::Provider { &m.provider } else { &m.platform };
            (m.platform.as_str().to_owned(), pointer.get(record).cloned().unwrap_or(Value::Null))
        })
        .collect()
}

/// Compares a record's versions field by field against `base` (the last synced fields by
/// platform pointer; `None` for a record never synced) and decides what each side gets.
/// A missing side (`None`) is a record the other side does not have yet: it gets every field
/// the direction lets through.
pub fn reconcile(
    mapping: &[FieldMapping],
    direction: Direction,
    policy: ConflictPolicy,
    base: Option<&Map<String, Value>>,
    provider: Option<&Version<'_>>,
    platform: Option<&Version<'_>>,
) -> Decision {
    let theirs = provider.map(|v| extract(mapping, v.record, Side::Provider));
    let ours = platform.map(|v| extract(mapping, v.record, Side::Platform));
    let newest_is_provider = match (provider.and_then(|v| v.updated_at), platform.and_then(|v| v.updated_at)) {
        (Some(p), Some(q)) => p >= q,
        (None, Some(_)) => false,
        _ => true,
    };
    let mut to_platform = BTreeMap::new();
    let mut to_provider = BTreeMap::new();
    let mut decision = Decision::default();
    for m in mapping {
        let key = m.platform.as_str();
        let flow = m.direction.unwrap_or(direction);
        let (inbound, outbound) = (flow.reads_provider(), flow.reads_platform());
        let b = base.and_then(|b| b.get(key));
        let v = theirs.as_ref().map(|t| &t[key]);
        let w = ours.as_ref().map(|o| &o[key]);
        let winner = match (v, w) {
            (Some(v), Some(w)) if v == w => {
                decision.synced.insert(key.to_owned(), v.clone());
                continue;
            }
            (Some(_), None) => Some(Side::Provider),
            (None, Some(_)) => Some(Side::Platform),
            (None, None) => None,
            (Some(v), Some(w)) => {
                let provider_changed = b != Some(v);
                let platform_changed = b != Some(w);
                match (provider_changed, platform_changed) {
                    (true, false) => Some(Side::Provider),
                    (false, true) => Some(Side::Platform),
                    _ => {
                        decision.contested += 1;
                        // A one-way field has one source of truth.
                        if !outbound {
                            Some(Side::Provider)
                        } else if !inbound {
                            Some(Side::Platform)
                        } else {
                            match policy {
                                ConflictPolicy::ProviderWins => Some(Side::Provider),
                                ConflictPolicy::PlatformWins => Some(Side::Platform),
                                ConflictPolicy::NewestWins if newest_is_provider => Some(Side::Provider),
                                ConflictPolicy::NewestWins => Some(Side::Platform),
                                ConflictPolicy::Manual => {
                                    decision.conflicts.push(key.to_owned());
                                    None
                                }
                            }
                        }
                    }
                }
            }
        };
        match winner {
            Some(Side::Provider) if inbound => {
                let value = v.cloned().unwrap_or(Value::Null);
                to_platform.insert(key.to_owned(), value.clone());
                decision.synced.insert(key.to_owned(), value);
            }
            Some(Side::Platform) if outbound => {
                let value = w.cloned().unwrap_or(Value::Null);
                to_provider.insert(m.provider.as_str().to_owned(), value.clone());
                decision.synced.insert(key.to_owned(), value);
            }
            // A change the field's direction does not carry, or a conflict kept for a person:
            // the last synced value stays the reference.
            _ => {
                if let Some(b) = b {
                    decision.synced.insert(key.to_owned(), b.clone());
                }
            }
        }
    }
    decision.to_platform = (!to_platform.is_empty()).then(|| to_platform.into_iter().collect());
    decision.to_provider = (!to_provider.is_empty()).then(|| to_provider.into_iter().collect());
    decision
}

/// Writes fields (by pointer) into a record, creating the objects on the way.
pub fn apply(record: &mut Value, fields: &Map<String, Value>) {
    for (pointer, value) in fields {
        if let Ok(pointer) = super::JsonPointer::new(pointer.clone()) {
            pointer.set(record, value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::JsonPointer;
    use serde_json::json;
    use time::macros::datetime;

    fn mapping() -> Vec<FieldMapping> {
        vec![
            FieldMapping {
                provider: JsonPointer::new("/fields/summary").unwrap(),
                platform: JsonPointer::new("/title").unwrap(),
                direction: None,
            },
            FieldMapping {
                provider: JsonPointer::new("/fields/state").unwrap(),
                platform: JsonPointer::new("/status").unwrap(),
                direction: None,
            },
        ]
    }

    fn provider(summary: &str, state: &str) -> Value {
        json!({"id": "1", "fields": {"summary": summary, "state": state}})
    }

    fn platform(title: &str, status: &str) -> Value {
        json!({"title": title, "status": status})
    }

    fn base(title: &str, status: &str) -> Map<String, Value> {
        extract(&mapping(), &platform(title, status), Side::Platform)
    }

    fn run(policy: ConflictPolicy, base_: Option<&Map<String, Value>>, p: &Value, q: &Value) -> Decision {
        let (pv, qv) = (Version { record: p, updated_at: None }, Version { record: q, updated_at: None });
        reconcile(&mapping(), Direction::Bidirectional, policy, base_, Some(&pv), Some(&qv))
    }

    #[test]
    fn unchanged_data_writes_nothing_on_either_side() {
        let b = base("a", "open");
        let d = run(ConflictPolicy::Manual, Some(&b), &provider("a", "open"), &platform("a", "open"));
        assert!(d.writes_nothing() && d.conflicts.is_empty());
        assert_eq!(d.synced, b, "the state stays");
    }

    #[test]
    fn a_field_changed_on_one_side_goes_to_the_other() {
        let b = base("a", "open");
        let d = run(ConflictPolicy::Manual, Some(&b), &provider("b", "open"), &platform("a", "closed"));
        assert_eq!(d.to_platform, Some(json!({"/title": "b"}).as_object().unwrap().clone()));
        assert_eq!(d.to_provider, Some(json!({"/fields/state": "closed"}).as_object().unwrap().clone()));
        assert_eq!(d.synced, base("b", "closed"));
        assert_eq!(d.contested, 0);
    }

    #[test]
    fn the_same_change_on_both_sides_is_no_conflict() {
        let b = base("a", "open");
        let d = run(ConflictPolicy::Manual, Some(&b), &provider("b", "open"), &platform("b", "open"));
        assert!(d.writes_nothing() && d.conflicts.is_empty());
        assert_eq!(d.synced, base("b", "open"));
    }

    #[test]
    fn each_policy_settles_a_field_changed_on_both_sides() {
        let b = base("a", "open");
        let (p, q) = (provider("from-provider", "open"), platform("from-platform", "open"));
        let d = run(ConflictPolicy::ProviderWins, Some(&b), &p, &q);
        assert_eq!(d.to_platform.unwrap()["/title"], "from-provider");
        assert!(d.to_provider.is_none());
        let d = run(ConflictPolicy::PlatformWins, Some(&b), &p, &q);
        assert_eq!(d.to_provider.unwrap()["/fields/summary"], "from-platform");
        assert!(d.to_platform.is_none());
        let d = run(ConflictPolicy::Manual, Some(&b), &p, &q);
        assert!(d.writes_nothing());
        assert_eq!((d.conflicts, d.contested), (vec!["/title".to_owned()], 1));
        assert_eq!(d.synced, b, "a kept conflict leaves the base as it was");

        let older = datetime!(2026-01-01 00:00 UTC);
        let newer = datetime!(2026-01-02 00:00 UTC);
        for (pt, qt, winner) in [(newer, older, "from-provider"), (older, newer, "from-platform")] {
            let (pv, qv) = (Version { record: &p, updated_at: Some(pt) }, Version { record: &q, updated_at: Some(qt) });
            let d = reconcile(&mapping(), Direction::Bidirectional, ConflictPolicy::NewestWins, Some(&b), Some(&pv), Some(&qv));
            assert_eq!(d.synced["/title"], winner);
        }
    }

    #[test]
    fn one_way_fields_and_tasks_only_carry_their_way() {
        let mut one_way = mapping();
        one_way[1].direction = Some(Direction::Inbound);
        let b = base("a", "open");
        let (p, q) = (provider("a", "open"), platform("a", "closed"));
        let (pv, qv) = (Version { record: &p, updated_at: None }, Version { record: &q, updated_at: None });
        let d = reconcile(&one_way, Direction::Bidirectional, ConflictPolicy::Manual, Some(&b), Some(&pv), Some(&qv));
        assert!(d.writes_nothing(), "a platform edit of an inbound-only field is not sent: {d:?}");
        assert_eq!(d.synced["/status"], "open");

        let (p, q) = (provider("b", "done"), platform("c", "closed"));
        let (pv, qv) = (Version { record: &p, updated_at: None }, Version { record: &q, updated_at: None });
        let d = reconcile(&mapping(), Direction::Inbound, ConflictPolicy::Manual, Some(&b), Some(&pv), Some(&qv));
        assert_eq!(d.to_platform.unwrap().len(), 2, "inbound: the provider is the source of truth");
        assert!(d.to_provider.is_none() && d.conflicts.is_empty());
    }

    #[test]
    fn a_record_on_one_side_only_is_created_on_the_other() {
        let p = provider("new", "open");
        let pv = Version { record: &p, updated_at: None };
        let d = reconcile(&mapping(), Direction::Bidirectional, ConflictPolicy::Manual, None, Some(&pv), None);
        let fields = d.to_platform.expect("fields for the platform");
        let mut record = json!({});
        apply(&mut record, &fields);
        assert_eq!(record, platform("new", "open"));
        assert!(d.to_provider.is_none());
    }
}
