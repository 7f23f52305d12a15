//! The fields of an Instance record that EC2 shows, borrowed from the record and read in one
//! pass over its maps. DescribeInstances reads some thirty fields of every instance; a pointer
//! lookup per field searched the record's maps again each time, which was half the gateway's
//! time for a describe of 10,000 instances.

use serde::Deserialize;
use serde_json::Value;

/// One Instance record as EC2 sees it. Absent fields are empty; admission has checked the
/// record against its schema, so the types hold.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct InstanceView<'v> {
    #[serde(borrow)]
    metadata: Metadata<'v>,
    #[serde(borrow)]
    spec: Spec<'v>,
    #[serde(borrow)]
    status: Status<'v>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Metadata<'v> {
    #[serde(borrow)]
    labels: Labels<'v>,
    #[serde(borrow)]
    creation_timestamp: Option<&'v str>,
    /// Set once the record is being deleted (`kubectl delete`).
    #[serde(borrow)]
    deletion_timestamp: Option<&'v str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Labels<'v> {
    /// [`crds::ID_LABEL`].
    #[serde(rename = "karri.dev/id")]
    id: &'v str,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Spec<'v> {
    image_id: &'v str,
    instance_type: &'v str,
    #[serde(borrow)]
    key_name: Option<&'v str>,
    #[serde(borrow)]
    kernel_id: Option<&'v str>,
    #[serde(borrow)]
    ramdisk_id: Option<&'v str>,
    #[serde(borrow)]
    client_token: Option<&'v str>,
    #[serde(borrow)]
    availability_zone: Option<&'v str>,
    #[serde(borrow)]
    reservation_id: Option<&'v str>,
    launch_index: Option<u64>,
    desired_state: Option<crds::DesiredState>,
    #[serde(borrow)]
    security_group_ids: Vec<&'v str>,
    #[serde(borrow)]
    tags: Vec<Tag<'v>>,
    #[serde(borrow)]
    metadata_options: MetadataOptions<'v>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Tag<'v> {
    key: &'v str,
    value: &'v str,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct MetadataOptions<'v> {
    #[serde(borrow)]
    http_tokens: Option<&'v str>,
    http_put_response_hop_limit: Option<u64>,
    #[serde(borrow)]
    http_endpoint: Option<&'v str>,
    #[serde(borrow)]
    instance_metadata_tags: Option<&'v str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Status<'v> {
    state: Option<crds::InstanceState>,
    #[serde(borrow)]
    private_ip_address: Option<&'v str>,
    #[serde(borrow)]
    public_ip_address: Option<&'v str>,
    #[serde(borrow)]
    message: Option<&'v str>,
    #[serde(borrow)]
    reason: Option<&'v str>,
    #[serde(borrow)]
    launch_time: Option<&'v str>,
    #[serde(borrow)]
    state_transition_time: Option<&'v str>,
    #[serde(borrow)]
    availability_zone: Option<&'v str>,
    #[serde(borrow)]
    node_name: Option<&'v str>,
    #[serde(borrow)]
    mac_address: Option<&'v str>,
    #[serde(borrow)]
    conditions: Vec<ConditionView<'v>>,
    /// `null` while nothing is resolved (and the schema lets any of it be null).
    #[serde(borrow)]
    launch: Option<LaunchView<'v>>,
}

/// What the operator resolved for the launch: the images the domain boots.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LaunchView<'v> {
    #[serde(borrow)]
    kernel: Option<ArtifactView<'v>>,
    #[serde(borrow)]
    ramdisk: Option<ArtifactView<'v>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ArtifactView<'v> {
    #[serde(borrow)]
    image_id: Option<&'v str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConditionView<'v> {
    #[serde(borrow, rename = "type")]
    kind: &'v str,
    #[serde(borrow)]
    status: &'v str,
    #[serde(borrow)]
    message: Option<&'v str>,
}

/// The state reason of an instance that is pending because no node has room for it (EC2's
/// code for a launch it had no capacity for).
pub const NO_CAPACITY_REASON: &str = "Server.InsufficientInstanceCapacity";

/// `Some` non-empty string, as `actions::opt` reads one.
fn present(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

fn rfc3339(s: Option<&str>) -> Option<chrono::DateTime<chrono::Utc>> {
    present(s).and_then(super::rfc3339)
}

/// The state reason code of an instance its owner stopped or terminated.
const USER_SHUTDOWN: &str = "Client.UserInitiatedShutdown";

impl<'v> InstanceView<'v> {
    /// The view of an Instance record. A record that does not fit its schema (which admission
    /// forbids) is shown by its ID alone, and logged.
    pub fn of(v: &'v Value) -> Self {
        Self::deserialize(v).unwrap_or_else(|error| {
            let id = super::id_of(v);
            tracing::warn!(instance = id, %error, "an Instance record does not fit its schema");
            Self {
                metadata: Metadata {
                    labels: Labels { id },
                    ..Metadata::default()
                },
                ..Self::default()
            }
        })
    }

    /// The instance ID (`i-…`).
    pub fn id(&self) -> &'v str {
        self.metadata.labels.id
    }

    /// The state EC2 shows (see [`super::instances::shown`]): a record being deleted is asked
    /// to terminate, whatever its spec says.
    pub fn shown_state(&self) -> crds::InstanceState {
        let desired = if self.metadata.deletion_timestamp.is_some() {
            crds::DesiredState::Terminated
        } else {
            self.spec.desired_state.unwrap_or_default()
        };
        super::instances::shown(desired, self.status.state.unwrap_or_default())
    }

    /// `metadataOptions.state`: `pending` until the instance is placed on its node, whose
    /// metadata service serves it with the options of its record from then on (`applied`), as
    /// EC2 shows them; a stopped instance started again keeps `applied`.
    pub fn metadata_options_state(&self) -> &'static str {
        if self.status.node_name.is_none() {
            "pending"
        } else {
            "applied"
        }
    }

    /// The zone the instance runs in, else the one it asked for, else "".
    pub fn zone(&self) -> &'v str {
        present(self.status.availability_zone)
            .or(present(self.spec.availability_zone))
            .unwrap_or("")
    }

    /// The reservation: the one RunInstances made, or (applied with kubectl) its own.
    pub fn reservation(&self) -> String {
        match present(self.spec.reservation_id) {
            Some(r) => r.to_string(),
            None => format!("r-{}", self.id().trim_start_matches("i-")),
        }
    }

    /// The launch index within the reservation.
    pub fn launch_index(&self) -> u64 {
        self.spec.launch_index.unwrap_or(0)
    }

    /// The AMI.
    pub fn image_id(&self) -> &'v str {
        self.spec.image_id
    }

    /// The instance type.
    pub fn instance_type(&self) -> &'v str {
        self.spec.instance_type
    }

    /// The key pair's name, when one was given.
    pub fn key_name(&self) -> Option<&'v str> {
        present(self.spec.key_name)
    }

    /// The kernel image: the one the launch named, else the machine image's own that the
    /// operator resolved for the domain.
    pub fn kernel_id(&self) -> Option<&'v str> {
        let launched = self.status.launch.as_ref().and_then(|l| l.kernel.as_ref());
        present(self.spec.kernel_id).or(present(launched.and_then(|k| k.image_id)))
    }

    /// The ramdisk image: the one the launch named, else the machine image's own.
    pub fn ramdisk_id(&self) -> Option<&'v str> {
        let launched = self.status.launch.as_ref().and_then(|l| l.ramdisk.as_ref());
        present(self.spec.ramdisk_id).or(present(launched.and_then(|r| r.image_id)))
    }

    /// The client token of the launch, when one was given.
    pub fn client_token(&self) -> Option<&'v str> {
        present(self.spec.client_token)
    }

    /// The security groups.
    pub fn security_group_ids(&self) -> &[&'v str] {
        &self.spec.security_group_ids
    }

    /// The tags as (key, value) pairs.
    pub fn tags(&self) -> impl Iterator<Item = (&'v str, &'v str)> + '_ {
        self.spec.tags.iter().map(|t| (t.key, t.value))
    }

    /// IMDS `HttpTokens` (`optional` unless set).
    pub fn http_tokens(&self) -> &'v str {
        present(self.spec.metadata_options.http_tokens).unwrap_or("optional")
    }

    /// IMDS `HttpPutResponseHopLimit` (1 unless set).
    pub fn http_put_response_hop_limit(&self) -> u64 {
        self.spec
            .metadata_options
            .http_put_response_hop_limit
            .unwrap_or(1)
    }

    /// IMDS `HttpEndpoint` (`enabled` unless set).
    pub fn http_endpoint(&self) -> &'v str {
        present(self.spec.metadata_options.http_endpoint).unwrap_or("enabled")
    }

    /// IMDS `InstanceMetadataTags` (`disabled` unless set).
    pub fn instance_metadata_tags(&self) -> &'v str {
        present(self.spec.metadata_options.instance_metadata_tags).unwrap_or("disabled")
    }

    /// The MAC address of the instance's interface: the one its node reported, else the one
    /// its private address gives (`crds::subnet::mac_for`); none without an address.
    pub fn mac_address(&self) -> Option<String> {
        let ip = self.private_ip()?;
        present(self.status.mac_address)
            .map(str::to_string)
            .or_else(|| ip.parse().ok().map(crds::subnet::mac_for))
    }

    /// The ID of the instance's network interface: `eni-` and the instance ID's digits.
    pub fn network_interface_id(&self) -> String {
        let id = self.id();
        format!("eni-{}", id.strip_prefix("i-").unwrap_or(id))
    }

    /// The private address, once allocated.
    pub fn private_ip(&self) -> Option<&'v str> {
        // A terminated instance has given its address back (another may have it now).
        if self.shown_state() == crds::InstanceState::Terminated {
            return None;
        }
        present(self.status.private_ip_address)
    }

    /// The public address, when one is associated.
    pub fn public_ip(&self) -> Option<&'v str> {
        present(self.status.public_ip_address)
    }

    /// The status message, or "".
    pub fn message(&self) -> &'v str {
        match (present(self.status.reason), self.unplaced()) {
            (None, Some(why)) => why,
            _ => self.status.message.unwrap_or(""),
        }
    }

    /// The `reason` (StateTransitionReason) EC2 shows: `User initiated (YYYY-MM-DD HH:MM:SS GMT)`
    /// for an instance its owner stopped or terminated, at the time it changed state; else the
    /// state reason's message ([`InstanceView::message`]).
    pub fn transition_reason(&self) -> std::borrow::Cow<'v, str> {
        let at = self
            .status
            .state_transition_time
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        match (present(self.status.reason), at) {
            (Some(USER_SHUTDOWN), Some(at)) => std::borrow::Cow::Owned(format!(
                "User initiated ({})",
                at.with_timezone(&chrono::Utc)
                    .format("%Y-%m-%d %H:%M:%S GMT")
            )),
            _ => std::borrow::Cow::Borrowed(self.message()),
        }
    }

    /// The state reason code, when there is one: the operator's, or [`NO_CAPACITY_REASON`]
    /// for a pending instance that placement could not place (its `Scheduled` condition says
    /// why, shown as the message).
    pub fn reason(&self) -> Option<&'v str> {
        present(self.status.reason).or(self.unplaced().map(|_| NO_CAPACITY_REASON))
    }

    /// Why placement could not place a pending instance, if it could not.
    fn unplaced(&self) -> Option<&'v str> {
        if self.shown_state() != crds::InstanceState::Pending {
            return None;
        }
        self.status
            .conditions
            .iter()
            .find(|c| c.kind == crds::CONDITION_SCHEDULED && c.status == "False")
            .map(|c| c.message.unwrap_or("no node has room for it"))
    }

    /// When the instance was launched: its reported launch time, else the record's creation.
    pub fn launch_time(&self) -> chrono::DateTime<chrono::Utc> {
        rfc3339(self.status.launch_time).unwrap_or_else(|| self.created())
    }

    /// When the instance's record was made (its primary interface is made with it and stays
    /// attached across stops and starts, which move the launch time).
    pub fn created(&self) -> chrono::DateTime<chrono::Utc> {
        rfc3339(self.metadata.creation_timestamp).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> Value {
        json!({
            "apiVersion": "karri.dev/v1alpha1",
            "kind": "Instance",
            "metadata": {
                "name": "i-0abc",
                "labels": {"karri.dev/id": "i-0abc", "team": "x"},
                "creationTimestamp": "2026-01-02T03:04:05Z",
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {
                "imageId": "emi-1",
                "instanceType": "t1.micro",
                "keyName": "",
                "kernelId": "eki-2",
                "reservationId": "r-9",
                "launchIndex": 3,
                "desiredState": "stopped",
                "securityGroupIds": ["sg-1", "sg-2"],
                "tags": [{"key": "Name", "value": "web \"1\" <a&b>"}],
                "metadataOptions": {"httpTokens": "required"},
                "availabilityZone": "zone-a",
            },
            "status": {
                "state": "running",
                "privateIpAddress": "10.0.0.5",
                "conditions": [{"type": "Ready", "status": "True"}],
                "availabilityZone": "zone-b",
            }
        })
    }

    #[test]
    fn a_pending_instance_no_node_has_room_for_says_so_and_a_terminated_one_has_no_address() {
        let mut v = record();
        v["spec"]["desiredState"] = json!("running");
        v["status"] = json!({"state": "pending", "privateIpAddress": "10.0.0.5",
            "conditions": [{"type": "Scheduled", "status": "False", "reason": "Unplaceable",
                "message": "no node in zone karri-1b"}]});
        let view = InstanceView::of(&v);
        assert_eq!(view.reason(), Some(NO_CAPACITY_REASON));
        assert_eq!(view.message(), "no node in zone karri-1b");
        // Once placed, or with a reason of the operator's own, that is what shows.
        v["status"]["conditions"][0]["status"] = json!("True");
        assert_eq!(InstanceView::of(&v).reason(), None);
        v["status"]["conditions"][0]["status"] = json!("False");
        v["status"]["reason"] = json!("Client.UserInitiatedShutdown");
        v["status"]["message"] = json!("stopped by the user");
        let view = InstanceView::of(&v);
        assert_eq!(view.reason(), Some("Client.UserInitiatedShutdown"));
        assert_eq!(view.message(), "stopped by the user");
        assert_eq!(view.private_ip(), Some("10.0.0.5"));
        v["spec"]["desiredState"] = json!("terminated");
        v["status"]["state"] = json!("terminated");
        assert_eq!(InstanceView::of(&v).private_ip(), None);
    }

    #[test]
    fn view_reads_each_field_a_describe_shows() {
        let v = record();
        let view = InstanceView::of(&v);
        assert_eq!(view.id(), "i-0abc");
        assert_eq!(view.image_id(), "emi-1");
        assert_eq!(view.instance_type(), "t1.micro");
        assert_eq!(view.key_name(), None, "an empty key name is none");
        assert_eq!(view.kernel_id(), Some("eki-2"));
        assert_eq!(view.ramdisk_id(), None);
        // Images the launch did not name are the machine image's, as the operator resolved
        // them; the launch's own win.
        let mut resolved = record();
        resolved["status"]["launch"] = json!({"kernel": {"imageId": "eki-7", "location": "/k"},
            "ramdisk": {"imageId": "eri-8", "location": "/r"}});
        let view_resolved = InstanceView::of(&resolved);
        assert_eq!(view_resolved.kernel_id(), Some("eki-2"));
        assert_eq!(view_resolved.ramdisk_id(), Some("eri-8"));
        // Nulls the schema allows leave the rest of the view whole.
        for launch in [json!(null), json!({"kernel": null, "ramdisk": null})] {
            resolved["status"]["launch"] = launch;
            let view_nulls = InstanceView::of(&resolved);
            assert_eq!(view_nulls.ramdisk_id(), None);
            assert_eq!(view_nulls.instance_type(), "t1.micro");
            assert_eq!(view_nulls.private_ip(), Some("10.0.0.5"));
        }
        assert_eq!(view.reservation(), "r-9");
        assert_eq!(view.launch_index(), 3);
        assert_eq!(view.shown_state(), crds::InstanceState::Stopping);
        assert_eq!(view.zone(), "zone-b", "the reported zone wins");
        assert_eq!(view.security_group_ids(), ["sg-1", "sg-2"]);
        assert_eq!(
            view.tags().collect::<Vec<_>>(),
            [("Name", "web \"1\" <a&b>")]
        );
        assert_eq!(view.http_tokens(), "required");
        assert_eq!(view.http_put_response_hop_limit(), 1);
        assert_eq!(view.http_endpoint(), "enabled");
        assert_eq!(view.private_ip(), Some("10.0.0.5"));
        assert_eq!(view.public_ip(), None);
        assert_eq!(view.message(), "");
        assert_eq!(view.reason(), None);
        assert_eq!(view.launch_time().to_rfc3339(), "2026-01-02T03:04:05+00:00");
    }

    #[test]
    fn instance_applied_with_kubectl_is_its_own_reservation_in_the_zone_it_asked_for() {
        let v = json!({
            "metadata": {"labels": {"karri.dev/id": "i-0def"}},
            "spec": {"imageId": "emi-1", "instanceType": "t1.micro", "availabilityZone": "zone-a"},
        });
        let view = InstanceView::of(&v);
        assert_eq!(view.reservation(), "r-0def");
        assert_eq!(view.zone(), "zone-a");
        assert_eq!(view.launch_index(), 0);
        assert_eq!(view.shown_state(), crds::InstanceState::Pending);
    }

    #[test]
    fn metadata_options_are_pending_until_the_instance_is_on_its_node() {
        let with_state = |state: &str, node: Option<&str>| {
            json!({
                "metadata": {"labels": {"karri.dev/id": "i-0def"}},
                "spec": {"imageId": "emi-1", "instanceType": "t1.micro"},
                "status": {"state": state, "nodeName": node},
            })
        };
        for (state, node, want) in [
            ("pending", None, "pending"),
            // Started again after a stop: still on its node, its options still served.
            ("pending", Some("node-1"), "applied"),
            ("running", Some("node-1"), "applied"),
            ("stopped", Some("node-1"), "applied"),
            ("terminated", Some("node-1"), "applied"),
        ] {
            let v = with_state(state, node);
            assert_eq!(
                InstanceView::of(&v).metadata_options_state(),
                want,
                "{state} on {node:?}"
            );
        }
    }

    #[test]
    fn record_that_breaks_its_schema_is_shown_by_its_id() {
        let v = json!({
            "metadata": {"labels": {"karri.dev/id": "i-0bad"}},
            "spec": {"imageId": "emi-1", "launchIndex": "three"},
        });
        let view = InstanceView::of(&v);
        assert_eq!(view.id(), "i-0bad");
        assert_eq!(view.image_id(), "");
        assert_eq!(view.launch_index(), 0);
    }

    #[test]
    fn view_matches_the_pointer_reads_it_replaces() {
        let v = record();
        let view = InstanceView::of(&v);
        assert_eq!(view.id(), super::super::id_of(&v));
        assert_eq!(view.shown_state(), super::super::instances::shown_state(&v));
        assert_eq!(
            view.launch_time(),
            super::super::created(&v),
            "no launch time reported: the creation time"
        );
        assert_eq!(view.created(), super::super::created(&v));
    }
}
