//! Types shared by several kinds: conditions, tags and their helpers.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type saying the record is ready for use (instances: booted; nodes: agent healthy).
pub const CONDITION_READY: &str = "Ready";
/// Condition type saying an instance has been bound to a node.
pub const CONDITION_SCHEDULED: &str = "Scheduled";
/// Condition type the node agent reports on an instance: whether its domain runs.
pub const CONDITION_DOMAIN_RUNNING: &str = "DomainRunning";
/// `DomainRunning` reason (status `False`) a node agent reports when the guest of an instance
/// asked to run powered itself off; the operator then stops the instance, as EC2 does
/// (`instanceInitiatedShutdownBehavior` `stop`), and the agent does not boot it again.
pub const REASON_GUEST_SHUTDOWN: &str = "GuestShutdown";
/// `DomainRunning` reason (status `True`) a node agent reports while an instance's domain is
/// paused (libvirt pauses a domain whose disk fails, an administrator may pause one): the
/// instance is still running in EC2's terms, but its guest executes nothing, so its instance
/// status check is impaired.
pub const REASON_DOMAIN_PAUSED: &str = "Paused";

/// Whether a condition holds, as in Kubernetes' `metav1.ConditionStatus`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// It is not known whether the condition holds.
    #[default]
    Unknown,
}

impl ConditionStatus {
    /// The wire form: `True`, `False` or `Unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// One aspect of a record's observed state, shaped like Kubernetes' `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type in CamelCase, e.g. `Ready` or `Scheduled`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Whether the condition holds: `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason for the last transition, e.g. `NoCapacity`.
    #[serde(default)]
    pub reason: String,
    /// Human-readable detail about the last transition; may be empty.
    #[serde(default)]
    pub message: String,
    /// When the status last changed.
    pub last_transition_time: Time,
    /// The `metadata.generation` the condition was computed from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A condition of `type_` with `status`, `reason` and `message`, transitioned at `now`.
    pub fn new(
        type_: impl Into<String>,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
        now: Time,
    ) -> Self {
        Self {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
            observed_generation: None,
        }
    }

    /// The same condition, recording the generation it was computed from.
    pub fn with_observed_generation(mut self, generation: Option<i64>) -> Self {
        self.observed_generation = generation;
        self
    }
}

/// The condition of `type_` in `conditions`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == ConditionStatus::True)
}

/// Sets `new` in `conditions`, replacing the condition of the same type, like Kubernetes'
/// `meta.SetStatusCondition`: `lastTransitionTime` is kept from the old condition when the status
/// did not change. Returns whether anything changed, so callers can skip no-op status writes.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        None => {
            conditions.push(new);
            true
        }
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            if *old == new {
                false
            } else {
                *old = new;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    #[test]
    fn setting_a_new_condition_appends_it() {
        let mut conditions = Vec::new();
        let ready = Condition::new(CONDITION_READY, ConditionStatus::True, "Booted", "", at(10));
        assert!(set_condition(&mut conditions, ready.clone()));
        assert_eq!(conditions, vec![ready]);
    }

    #[test]
    fn unchanged_status_keeps_the_transition_time() {
        let mut conditions = vec![Condition::new(
            CONDITION_READY,
            ConditionStatus::True,
            "Booted",
            "",
            at(10),
        )];
        let later = Condition::new(CONDITION_READY, ConditionStatus::True, "Booted", "", at(20));
        assert!(!set_condition(&mut conditions, later));
        assert_eq!(conditions[0].last_transition_time, at(10));
    }

    #[test]
    fn changed_status_moves_the_transition_time() {
        let mut conditions = vec![Condition::new(
            CONDITION_READY,
            ConditionStatus::True,
            "Booted",
            "",
            at(10),
        )];
        let lost = Condition::new(
            CONDITION_READY,
            ConditionStatus::False,
            "DomainGone",
            "the domain disappeared",
            at(20),
        );
        assert!(set_condition(&mut conditions, lost));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(20));
        assert!(!is_condition_true(&conditions, CONDITION_READY));
    }

    #[test]
    fn condition_serializes_with_kubernetes_field_names() {
        let c = Condition::new(
            CONDITION_SCHEDULED,
            ConditionStatus::True,
            "Bound",
            "",
            at(0),
        )
        .with_observed_generation(Some(3));
        let json = serde_json::to_value(&c).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "type": "Scheduled",
                "status": "True",
                "reason": "Bound",
                "message": "",
                "lastTransitionTime": "1970-01-01T00:00:00Z",
                "observedGeneration": 3,
            })
        );
    }
}

/// Most tags a resource may carry, as EC2 allows.
pub const MAX_TAGS: usize = 50;

/// An EC2 tag: a key and a value (the value may be empty). Unlike labels, tag keys and values
/// may hold any Unicode text, so they live in the spec, not in `metadata.labels`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct Tag {
    /// The key: 1 to 128 characters, not starting with `aws:`.
    pub key: String,
    /// The value: at most 256 characters.
    #[serde(default)]
    pub value: String,
}

impl Tag {
    /// A tag from its key and value.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Tag {
            key: key.into(),
            value: value.into(),
        }
    }
}
