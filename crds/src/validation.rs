//! Pure admission checks: the [`Validate`] trait, its error type and the field checks the kinds
//! share.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

/// Largest decoded `userData` EC2 accepts, in bytes (16 KiB).
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// Why a record was refused. Messages are short sentences naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The kind is not one of the kinds this crate defines.
    #[error("kind {0} is not a karri.dev/v1alpha1 kind")]
    UnknownKind(String),
    /// The object's `apiVersion` is not `karri.dev/v1alpha1`.
    #[error("apiVersion must be karri.dev/v1alpha1, not {0}")]
    WrongApiVersion(String),
    /// The object's `kind` is not the kind it was submitted as.
    #[error("kind must be {expected}, not {found}")]
    WrongKind {
        /// The kind the object was submitted as.
        expected: String,
        /// The kind the object says it is.
        found: String,
    },
    /// A required field is absent.
    #[error("{field} is required")]
    Missing {
        /// Path of the field, e.g. `spec`.
        field: String,
    },
    /// A field does not have the expected JSON shape (wrong type, unknown enum value ...).
    #[error("{field} is malformed: {message}")]
    Malformed {
        /// Path of the field, e.g. `spec.desiredState`.
        field: String,
        /// The deserializer's explanation.
        message: String,
    },
    /// The object carries a field the schema does not define (a typo, usually).
    #[error("{field} is not a known field")]
    UnknownField {
        /// Path of the field, e.g. `spec.imageID`.
        field: String,
    },
    /// A field is well-formed but its value breaks a rule.
    #[error("{field} must {requirement}")]
    Invalid {
        /// Path of the field, e.g. `spec.imageId`.
        field: String,
        /// The rule, phrased to follow "must", e.g. `look like emi-0123456789abcdef0`.
        requirement: String,
    },
}

impl ValidationError {
    /// Path of the offending field (e.g. `spec.imageId`), when the error is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Missing { field }
            | Self::Malformed { field, .. }
            | Self::UnknownField { field }
            | Self::Invalid { field, .. } => Some(field),
            Self::UnknownKind(_) | Self::WrongApiVersion(_) | Self::WrongKind { .. } => None,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, requirement: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            requirement: requirement.into(),
        }
    }
}

/// Pure, local checks of one spec or status, run by admission on create and update.
///
/// Checks only what the value alone can tell (formats, ranges); references to other records
/// (does the image exist?) are the gateway's and controllers' business.
pub trait Validate {
    /// `Ok` when the value may be stored; otherwise the first rule it breaks.
    fn validate(&self) -> Result<(), ValidationError>;
}

/// Whether `id` is `<prefix>-` followed by exactly 17 lowercase hex digits, e.g.
/// `is_valid_id("i", "i-0123456789abcdef0")`.
pub fn is_valid_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            hex.len() == 17
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Checks `spec.kernelId` (`eki-`/`aki-`) and `spec.ramdiskId` (`eri-`/`ari-`) when set.
pub(crate) fn check_boot_ids(
    kernel_id: Option<&str>,
    ramdisk_id: Option<&str>,
) -> Result<(), ValidationError> {
    if let Some(id) = kernel_id {
        check_id(
            "spec.kernelId",
            id,
            &["eki", "aki"],
            "eki-0123456789abcdef0",
        )?;
    }
    if let Some(id) = ramdisk_id {
        check_id(
            "spec.ramdiskId",
            id,
            &["eri", "ari"],
            "eri-0123456789abcdef0",
        )?;
    }
    Ok(())
}

/// Whether `id` is a 12-digit AWS account id such as `123456789012`.
pub fn is_valid_account_id(id: &str) -> bool {
    id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit())
}

const USER_DATA_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes EC2 `userData`: standard base64, padding optional, ASCII whitespace (line breaks from
/// `base64` tools) ignored. Fails when the text is not base64 or decodes to more than
/// [`MAX_USER_DATA_BYTES`]. The metadata service must decode with this same function.
pub fn decode_user_data(user_data: &str) -> Result<Vec<u8>, ValidationError> {
    let compact: Vec<u8> = user_data
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let decoded = USER_DATA_ENGINE
        .decode(&compact)
        .map_err(|_| ValidationError::invalid("spec.userData", "be base64-encoded"))?;
    if decoded.len() > MAX_USER_DATA_BYTES {
        return Err(ValidationError::invalid(
            "spec.userData",
            "decode to at most 16384 bytes",
        ));
    }
    Ok(decoded)
}

/// Whether `name` is a Kubernetes DNS-1123 subdomain (lowercase alphanumerics, `-` and `.`,
/// starting and ending alphanumeric, at most 253 characters): the form of record names that
/// specs refer to, such as instance types (`m1.small`) and zones (`karri-1a`).
pub fn is_valid_record_name(name: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            bytes.len() <= 253
                && alnum(first)
                && alnum(last)
                && bytes.iter().all(|&b| alnum(b) || b == b'-' || b == b'.')
        }
        _ => false,
    }
}

/// `field` must be a record name (see [`is_valid_record_name`]); `example` is shown in the
/// message.
pub(crate) fn check_record_name(
    field: &str,
    value: &str,
    example: &str,
) -> Result<(), ValidationError> {
    if is_valid_record_name(value) {
        Ok(())
    } else {
        Err(ValidationError::invalid(
            field,
            format!("be a lowercase name such as {example}"),
        ))
    }
}

/// `field` must be non-empty, printable text of at most `max` characters.
pub(crate) fn check_text(field: &str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::invalid(field, "not be empty"));
    }
    if value.chars().count() > max {
        return Err(ValidationError::invalid(
            field,
            format!("be at most {max} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(ValidationError::invalid(
            field,
            "not contain control characters",
        ));
    }
    Ok(())
}

/// `field` must be an ID with one of `prefixes`; `example` is shown in the message.
pub(crate) fn check_id(
    field: &str,
    value: &str,
    prefixes: &[&str],
    example: &str,
) -> Result<(), ValidationError> {
    if prefixes.iter().any(|p| is_valid_id(p, value)) {
        Ok(())
    } else {
        Err(ValidationError::invalid(
            field,
            format!("look like {example}"),
        ))
    }
}

/// `field` must parse as an IPv4 or IPv6 address.
pub(crate) fn check_ip(field: &str, value: &str) -> Result<(), ValidationError> {
    value
        .parse::<std::net::IpAddr>()
        .map(|_| ())
        .map_err(|_| ValidationError::invalid(field, "be an IP address"))
}

/// EC2's rules for a resource's tags: at most 50, keys 1–128 characters not starting with
/// `aws:`, values at most 256 characters, no key twice.
pub fn check_tags(field: &str, tags: &[crate::common::Tag]) -> Result<(), ValidationError> {
    if tags.len() > crate::common::MAX_TAGS {
        return Err(ValidationError::invalid(
            field,
            format!("hold at most {} tags", crate::common::MAX_TAGS),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, tag) in tags.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let len = tag.key.chars().count();
        if len == 0 || len > 128 {
            return Err(ValidationError::invalid(
                format!("{at}.key"),
                "be 1 to 128 characters",
            ));
        }
        if tag.key.to_ascii_lowercase().starts_with("aws:") {
            return Err(ValidationError::invalid(
                format!("{at}.key"),
                "not start with aws:, which is reserved",
            ));
        }
        if tag.value.chars().count() > 256 {
            return Err(ValidationError::invalid(
                format!("{at}.value"),
                "be at most 256 characters",
            ));
        }
        // EC2 takes any character in a tag; tab, line feed and carriage return are kept (a
        // multi-line description). Other control characters are refused: XML 1.0, which every
        // EC2 answer is, cannot carry C0 controls, and DEL and the C1 controls, which it may,
        // are refused with them (no terminal or table shows them as they are).
        if tag
            .key
            .chars()
            .chain(tag.value.chars())
            .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        {
            return Err(ValidationError::invalid(
                at.clone(),
                "hold no control characters but tab, line feed and carriage return",
            ));
        }
        if !seen.insert(tag.key.as_str()) {
            return Err(ValidationError::invalid(
                format!("{at}.key"),
                format!("not repeat the key {:?}", tag.key),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_need_the_prefix_a_dash_and_17_lowercase_hex_digits() {
        let rows = [
            ("i", "i-0123456789abcdef0", true),
            ("emi", "emi-0123456789abcdef0", true),
            ("i", "i-0123456789abcdef", false),
            ("i", "i-0123456789abcdef01", false),
            ("i", "i-0123456789ABCDEF0", false),
            ("i", "i-0123456789abcdefg", false),
            ("i", "emi-0123456789abcdef0", false),
            ("i", "i0123456789abcdef0", false),
            ("i", "i_0123456789abcdef0", false),
            ("i", "", false),
        ];
        for (prefix, id, ok) in rows {
            assert_eq!(
                is_valid_id(prefix, id),
                ok,
                "is_valid_id({prefix:?}, {id:?})"
            );
        }
    }

    #[test]
    fn tags_keep_tabs_and_line_ends_and_refuse_other_control_characters() {
        let tag = |key: &str, value: &str| crate::common::Tag {
            key: key.into(),
            value: value.into(),
        };
        let rows = [
            (tag("Description", "line one\nline two\r\n\tindented"), true),
            (tag("a\tb", "x"), true),
            (tag("emoji", "\u{1F680} <&> \u{2028}"), true),
            (tag("bell", "a\u{7}b"), false),
            (tag("nul\u{0}", "x"), false),
            (tag("del", "\u{7f}"), false),
        ];
        for (t, ok) in rows {
            assert_eq!(
                check_tags("spec.tags", std::slice::from_ref(&t)).is_ok(),
                ok,
                "{t:?}"
            );
        }
    }

    #[test]
    fn account_ids_are_twelve_digits() {
        assert!(is_valid_account_id("123456789012"));
        assert!(!is_valid_account_id("12345678901"));
        assert!(!is_valid_account_id("12345678901a"));
    }

    #[test]
    fn user_data_decodes_with_or_without_padding_and_line_breaks() {
        let rows = [
            ("aGVsbG8=", Some(&b"hello"[..])),
            ("aGVsbG8", Some(&b"hello"[..])),
            ("aGVs\nbG8=\n", Some(&b"hello"[..])),
            ("", Some(&b""[..])),
            ("not base64!", None),
            ("aGVsbG8===", None),
        ];
        for (input, expected) in rows {
            assert_eq!(
                decode_user_data(input).ok().as_deref(),
                expected,
                "{input:?}"
            );
        }
    }

    #[test]
    fn user_data_over_16_kib_is_rejected() {
        let exact = USER_DATA_ENGINE.encode(vec![0u8; MAX_USER_DATA_BYTES]);
        assert!(decode_user_data(&exact).is_ok());
        let over = USER_DATA_ENGINE.encode(vec![0u8; MAX_USER_DATA_BYTES + 1]);
        assert_eq!(
            decode_user_data(&over).expect_err("too large").to_string(),
            "spec.userData must decode to at most 16384 bytes"
        );
    }

    #[test]
    fn record_names_follow_dns_subdomain_rules() {
        for ok in ["m1.small", "karri-1a", "a", "t1.micro"] {
            assert!(is_valid_record_name(ok), "{ok}");
        }
        for bad in ["", "M1.small", "-a", "a-", "a_b", "a b", &"a".repeat(254)] {
            assert!(!is_valid_record_name(bad), "{bad}");
        }
    }
}
