//! What a node needs to boot an instance, resolved by the operator once the instance is placed:
//! its image artifacts (machine disk, kernel, ramdisk), its public key, its account ID and its
//! private address. A node reads only the instances bound to it, never images or key pairs, so
//! everything it boots from is copied into `status.launch` here.
//!
//! The decisions are pure functions ([`assemble`], [`visible_to`], [`allocate_address`]); the
//! lookups ([`resolve`]) go through the gateway's resource API.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use crds::subnet::Subnet;
use crds::{
    Account, Image, ImageArtifact, ImageType, Instance, InstanceState, KeyPair, LaunchSpec,
};
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};

/// Why an instance cannot be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The instance can never launch as asked: it fails, with this explanation.
    #[error("{0}")]
    Refused(String),
    /// A lookup failed; try again.
    #[error("looking up the launch: {0}")]
    Api(#[from] kube::Error),
}

/// The IDs an image may be stored under: the ID as given and its Eucalyptus spelling (`ami-` is
/// `emi-`, `aki-` is `eki-`, `ari-` is `eri-`).
pub fn image_id_candidates(id: &str) -> Vec<String> {
    let mut ids = vec![id.to_owned()];
    if let Some((prefix, hex)) = id.split_once('-') {
        let euca = match prefix {
            "ami" => Some("emi"),
            "aki" => Some("eki"),
            "ari" => Some("eri"),
            _ => None,
        };
        if let Some(p) = euca {
            ids.push(format!("{p}-{hex}"));
        }
    }
    ids
}

/// Whether the account of namespace `ns` (12-digit `account_id`) may launch `image`: its own,
/// public, or shared with it by a launch permission.
pub fn visible_to(image: &Image, ns: &str, account_id: Option<&str>) -> bool {
    image.namespace().as_deref() == Some(ns)
        || image.spec.public
        || account_id.is_some_and(|a| image.spec.launch_permissions.iter().any(|p| p == a))
}

/// The artifact a node fetches for `image`.
pub fn artifact(id: &str, image: &Image) -> ImageArtifact {
    ImageArtifact {
        image_id: id.to_owned(),
        location: image.spec.image_location.clone(),
        sha256: image.spec.checksum_sha256.clone(),
        format: image.spec.format,
    }
}

/// An image found by ID, with the ID it was asked for.
pub struct Found<'a> {
    /// The ID as the instance names it.
    pub id: &'a str,
    /// The image record.
    pub image: &'a Image,
}

/// The launch of an instance from its machine image and, when it boots a kernel, the kernel
/// and ramdisk images; each must be of the right type.
pub fn assemble(
    machine: Found<'_>,
    kernel: Option<Found<'_>>,
    ramdisk: Option<Found<'_>>,
    public_key: Option<String>,
    account_id: Option<String>,
    subnet: Option<Subnet>,
) -> Result<LaunchSpec, LaunchError> {
    let typed = |f: &Found<'_>, want: ImageType| {
        if f.image.spec.image_type == want {
            Ok(artifact(f.id, f.image))
        } else {
            Err(LaunchError::Refused(format!(
                "image {} is a {} image, not a {} image",
                f.id,
                f.image.spec.image_type.as_str(),
                want.as_str()
            )))
        }
    };
    let root = typed(&machine, ImageType::Machine)?;
    let kernel = kernel.map(|k| typed(&k, ImageType::Kernel)).transpose()?;
    let ramdisk = ramdisk.map(|r| typed(&r, ImageType::Ramdisk)).transpose()?;
    if ramdisk.is_some() && kernel.is_none() {
        return Err(LaunchError::Refused(format!(
            "image {} names a ramdisk but no kernel",
            machine.id
        )));
    }
    Ok(LaunchSpec {
        root: Some(root),
        kernel,
        ramdisk,
        public_key,
        account_id,
        subnet_cidr: subnet.map(|s| s.to_string()),
    })
}

/// The lowest free address of `subnet` for an instance of `zone`: not held by a live (not
/// terminated) instance of the zone, nor in `reserved` (addresses handed out but not yet seen
/// back through the watch).
pub fn allocate_address<'a>(
    subnet: Subnet,
    zone: &str,
    instances: impl IntoIterator<Item = &'a Instance>,
    reserved: &HashSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let mut used: HashSet<Ipv4Addr> = reserved.clone();
    for i in instances {
        let Some(s) = &i.status else { continue };
        if s.state == InstanceState::Terminated || s.availability_zone.as_deref() != Some(zone) {
            continue;
        }
        if let Some(ip) = s.private_ip_address.as_deref().and_then(|a| a.parse().ok()) {
            used.insert(ip);
        }
    }
    subnet.first_free(&used)
}

/// Where launches are resolved from: the operator's caches of images, accounts and key pairs,
/// and the resource API for what a cache does not hold yet (a record created a moment ago).
pub struct Lookups {
    /// The resource API.
    pub client: Client,
    /// Every image.
    pub images: Store<Image>,
    /// Every account.
    pub accounts: Store<Account>,
    /// Every key pair.
    pub keys: Store<KeyPair>,
}

impl Lookups {
    /// The image of `id` visible to namespace `ns`.
    async fn image(
        &self,
        id: &str,
        ns: &str,
        account_id: Option<&str>,
    ) -> Result<Option<Image>, kube::Error> {
        let candidates = image_id_candidates(id);
        let cached = self.images.state().into_iter().find(|i| {
            i.labels()
                .get(crds::ID_LABEL)
                .is_some_and(|own| candidates.contains(own))
                && visible_to(i, ns, account_id)
        });
        if let Some(image) = cached {
            return Ok(Some((*image).clone()));
        }
        let api: Api<Image> = Api::all(self.client.clone());
        for candidate in candidates {
            let selector = format!("{}={candidate}", crds::ID_LABEL);
            let found = api.list(&ListParams::default().labels(&selector)).await?;
            if let Some(image) = found
                .items
                .into_iter()
                .find(|i| visible_to(i, ns, account_id))
            {
                return Ok(Some(image));
            }
        }
        Ok(None)
    }

    /// The 12-digit ID of the account owning namespace `ns`, if it has one.
    async fn account_id(&self, ns: &str) -> Result<Option<String>, kube::Error> {
        let account = match self.accounts.get(&ObjectRef::new(ns)) {
            Some(a) => Some((*a).clone()),
            None => Api::<Account>::all(self.client.clone()).get_opt(ns).await?,
        };
        Ok(account.and_then(|a| a.status).and_then(|s| s.account_id))
    }

    /// The public key of key pair `name` in namespace `ns`.
    async fn public_key(&self, ns: &str, name: &str) -> Result<Option<String>, kube::Error> {
        let cached = self
            .keys
            .state()
            .into_iter()
            .find(|k| k.namespace().as_deref() == Some(ns) && k.spec.key_name == name);
        let key = match cached {
            Some(k) => Some((*k).clone()),
            None => Api::<KeyPair>::namespaced(self.client.clone(), ns)
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .find(|k| k.spec.key_name == name),
        };
        Ok(key.map(|k| format!("{} {name}", k.spec.public_key.trim())))
    }
}

/// Resolves the launch of `instance`: from the caches, else through the resource API.
pub async fn resolve(
    lookups: &Lookups,
    instance: &Instance,
    subnet: Option<Subnet>,
) -> Result<LaunchSpec, LaunchError> {
    let ns = instance
        .namespace()
        .ok_or_else(|| LaunchError::Refused("the instance has no namespace".into()))?;
    let account_id = lookups.account_id(&ns).await?;
    let account = account_id.as_deref();
    let spec = &instance.spec;
    let not_found = |what: &str, id: &str| {
        LaunchError::Refused(format!(
            "the {what} image {id} does not exist or is not yours"
        ))
    };
    let machine = lookups
        .image(&spec.image_id, &ns, account)
        .await?
        .ok_or_else(|| not_found("machine", &spec.image_id))?;
    let kernel_id = spec
        .kernel_id
        .clone()
        .or_else(|| machine.spec.kernel_id.clone());
    let ramdisk_id = spec
        .ramdisk_id
        .clone()
        .or_else(|| machine.spec.ramdisk_id.clone());
    let kernel = match &kernel_id {
        Some(id) => Some((
            id.clone(),
            lookups
                .image(id, &ns, account)
                .await?
                .ok_or_else(|| not_found("kernel", id))?,
        )),
        None => None,
    };
    let ramdisk = match &ramdisk_id {
        Some(id) => Some((
            id.clone(),
            lookups
                .image(id, &ns, account)
                .await?
                .ok_or_else(|| not_found("ramdisk", id))?,
        )),
        None => None,
    };
    let public_key = match &spec.key_name {
        Some(name) => Some(lookups.public_key(&ns, name).await?.ok_or_else(|| {
            LaunchError::Refused(format!("the key pair {name:?} does not exist"))
        })?),
        None => None,
    };
    assemble(
        Found {
            id: &spec.image_id,
            image: &machine,
        },
        kernel.as_ref().map(|(id, image)| Found { id, image }),
        ramdisk.as_ref().map(|(id, image)| Found { id, image }),
        public_key,
        account_id,
        subnet,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{DiskImageFormat, ImageSpec, InstanceSpec, InstanceStatus};

    fn image(ns: &str, image_type: ImageType) -> Image {
        let spec: ImageSpec = serde_json::from_value(serde_json::json!({
            "name": "micro",
            "imageLocation": "/var/lib/karri/images/micro",
            "imageType": image_type,
        }))
        .expect("a valid image spec");
        let mut i = Image::new("img", spec);
        i.metadata.namespace = Some(ns.into());
        i
    }

    fn instance(zone: &str, ip: &str, state: InstanceState) -> Instance {
        let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
            "imageId": "emi-0123456789abcdef0", "instanceType": "t1.micro"
        }))
        .expect("a valid instance spec");
        let mut i = Instance::new("i", spec);
        i.status = Some(InstanceStatus {
            state,
            availability_zone: Some(zone.into()),
            private_ip_address: Some(ip.into()),
            ..InstanceStatus::default()
        });
        i
    }

    #[test]
    fn aws_spellings_of_image_ids_also_find_the_eucalyptus_ones() {
        assert_eq!(
            image_id_candidates("ami-0123456789abcdef0"),
            ["ami-0123456789abcdef0", "emi-0123456789abcdef0"]
        );
        assert_eq!(image_id_candidates("aki-1")[1], "eki-1");
        assert_eq!(image_id_candidates("ari-1")[1], "eri-1");
        assert_eq!(image_id_candidates("emi-1"), ["emi-1"]);
    }

    #[test]
    fn an_image_is_launchable_by_its_owner_by_everyone_when_public_and_by_those_it_is_shared_with()
    {
        let mut own = image("acme", ImageType::Machine);
        assert!(visible_to(&own, "acme", None));
        assert!(!visible_to(&own, "other", Some("111111111111")));
        own.spec.launch_permissions = vec!["111111111111".into()];
        assert!(visible_to(&own, "other", Some("111111111111")));
        assert!(!visible_to(&own, "other", Some("222222222222")));
        own.spec.public = true;
        assert!(visible_to(&own, "other", None));
    }

    #[test]
    fn a_launch_names_the_artifacts_of_the_right_types() {
        let machine = image("acme", ImageType::Machine);
        let kernel = image("acme", ImageType::Kernel);
        let mut ramdisk = image("acme", ImageType::Ramdisk);
        ramdisk.spec.format = DiskImageFormat::Raw;
        ramdisk.spec.checksum_sha256 = Some("ab".repeat(32));
        let launch = assemble(
            Found {
                id: "emi-1",
                image: &machine,
            },
            Some(Found {
                id: "eki-1",
                image: &kernel,
            }),
            Some(Found {
                id: "eri-1",
                image: &ramdisk,
            }),
            Some("ssh-ed25519 AAAA k".into()),
            Some("123456789012".into()),
            "172.31.0.0/20".parse().ok(),
        )
        .expect("a bootable triple");
        assert_eq!(
            launch.root.as_ref().map(|r| r.image_id.as_str()),
            Some("emi-1")
        );
        assert_eq!(
            launch.kernel.as_ref().map(|r| r.image_id.as_str()),
            Some("eki-1")
        );
        assert_eq!(
            launch.ramdisk.as_ref().and_then(|r| r.sha256.clone()),
            Some("ab".repeat(32))
        );
        assert_eq!(launch.subnet_cidr.as_deref(), Some("172.31.0.0/20"));
    }

    #[test]
    fn a_kernel_image_cannot_be_booted_as_a_machine_or_a_machine_as_a_kernel() {
        let machine = image("acme", ImageType::Machine);
        let kernel = image("acme", ImageType::Kernel);
        let wrong_root = assemble(
            Found {
                id: "eki-1",
                image: &kernel,
            },
            None,
            None,
            None,
            None,
            None,
        );
        assert!(matches!(wrong_root, Err(LaunchError::Refused(m)) if m.contains("kernel image")));
        let wrong_kernel = assemble(
            Found {
                id: "emi-1",
                image: &machine,
            },
            Some(Found {
                id: "emi-2",
                image: &machine,
            }),
            None,
            None,
            None,
            None,
        );
        assert!(matches!(wrong_kernel, Err(LaunchError::Refused(m)) if m.contains("not a kernel")));
    }

    #[test]
    fn addresses_are_never_given_twice_in_a_zone_and_terminated_ones_are_free_again() {
        let subnet: Subnet = "172.31.0.0/20".parse().expect("valid");
        let live = instance("karri-1a", "172.31.0.4", InstanceState::Running);
        let gone = instance("karri-1a", "172.31.0.5", InstanceState::Terminated);
        let elsewhere = instance("karri-1b", "172.31.0.6", InstanceState::Running);
        let reserved: HashSet<Ipv4Addr> = [Ipv4Addr::new(172, 31, 0, 6)].into();
        let got = allocate_address(subnet, "karri-1a", [&live, &gone, &elsewhere], &reserved);
        assert_eq!(got, Some(Ipv4Addr::new(172, 31, 0, 5)));
        let none_reserved = allocate_address(subnet, "karri-1a", [&live], &HashSet::new());
        assert_eq!(none_reserved, Some(Ipv4Addr::new(172, 31, 0, 5)));
    }
}
