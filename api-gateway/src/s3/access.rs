//! Who may do what to a bucket or object: the owner everything, others what the canned ACLs
//! grant. A pure function, decided before any byte is read or written.

use crds::CannedAcl;

/// The caller of an S3 request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who<'a> {
    /// An unsigned request.
    Anonymous,
    /// A signed request of the account with this 12-digit ID.
    Account(&'a str),
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// List or head the bucket.
    ListBucket,
    /// Read or change the bucket's own settings (ACL, tags, location) or delete it.
    BucketConfig,
    /// Read an object (GET, HEAD, copy source).
    ReadObject,
    /// Create, overwrite or delete objects, and multipart uploads.
    WriteObject,
    /// Read or change an object's ACL or tags.
    ObjectConfig,
}

/// Whether `who` may do `action` in a bucket owned by `owner_id` with ACL `bucket_acl`, on an
/// object with ACL `object_acl` (for object reads).
pub fn allowed(
    who: Who<'_>,
    action: Action,
    owner_id: &str,
    bucket_acl: CannedAcl,
    object_acl: Option<CannedAcl>,
) -> bool {
    if who == Who::Account(owner_id) {
        return true;
    }
    let signed = matches!(who, Who::Account(_));
    let grants_read = |acl: CannedAcl| match acl {
        CannedAcl::PublicRead | CannedAcl::PublicReadWrite => true,
        CannedAcl::AuthenticatedRead => signed,
        CannedAcl::Private => false,
    };
    match action {
        Action::ListBucket => grants_read(bucket_acl),
        Action::WriteObject => bucket_acl == CannedAcl::PublicReadWrite,
        Action::ReadObject => object_acl.is_some_and(grants_read),
        Action::BucketConfig | Action::ObjectConfig => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CannedAcl::*;

    #[test]
    fn the_acl_matrix_grants_exactly_what_aws_grants() {
        const OWNER: &str = "111111111111";
        let other = Who::Account("222222222222");
        let anon = Who::Anonymous;
        let owner = Who::Account(OWNER);
        // (who, action, bucket ACL, object ACL, allowed)
        let rows = [
            (owner, Action::BucketConfig, Private, None, true),
            (owner, Action::ReadObject, Private, Some(Private), true),
            (other, Action::ListBucket, Private, None, false),
            (other, Action::ReadObject, Private, Some(Private), false),
            (other, Action::WriteObject, Private, None, false),
            (other, Action::BucketConfig, PublicReadWrite, None, false),
            (
                other,
                Action::ObjectConfig,
                Private,
                Some(PublicReadWrite),
                false,
            ),
            (anon, Action::ListBucket, PublicRead, None, true),
            (anon, Action::ListBucket, AuthenticatedRead, None, false),
            (other, Action::ListBucket, AuthenticatedRead, None, true),
            (anon, Action::WriteObject, PublicRead, None, false),
            (anon, Action::WriteObject, PublicReadWrite, None, true),
            (other, Action::WriteObject, PublicReadWrite, None, true),
            (anon, Action::ReadObject, Private, Some(PublicRead), true),
            (anon, Action::ReadObject, PublicRead, Some(Private), false),
            (
                anon,
                Action::ReadObject,
                Private,
                Some(AuthenticatedRead),
                false,
            ),
            (
                other,
                Action::ReadObject,
                Private,
                Some(AuthenticatedRead),
                true,
            ),
            (anon, Action::ReadObject, Private, None, false),
        ];
        for (who, action, bucket, object, want) in rows {
            assert_eq!(
                allowed(who, action, OWNER, bucket, object),
                want,
                "{who:?} {action:?} bucket {bucket:?} object {object:?}"
            );
        }
    }
}
