//! Kubernetes label syntax: validation of keys and values, and turning a
//! free-form canary tag (often a branch name) into a valid label value.

/// Longest label value (and longest name part of a label key).
pub const MAX_VALUE_LEN: usize = 63;

/// Length of the hash suffix appended when a tag is shortened.
const HASH_LEN: usize = 8;

fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Checks a label value: at most 63 characters of `[A-Za-z0-9._-]`,
/// alphanumeric at both ends. The empty value is valid.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_LEN {
        return Err(format!(
            "{value:?} is longer than {MAX_VALUE_LEN} characters"
        ));
    }
    if let Some(bad) = value.chars().find(|c| !is_value_char(*c)) {
        return Err(format!(
            "{value:?} contains {bad:?}; only [A-Za-z0-9._-] are allowed"
        ));
    }
    let alnum_ends = value.is_empty()
        || (value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()));
    if !alnum_ends {
        return Err(format!(
            "{value:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks a label or annotation key: an optional DNS-subdomain prefix and
/// `/`, then a name of at most 63 characters (`[A-Za-z0-9._-]`,
/// alphanumeric at both ends).
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if prefix.is_some_and(|p| !is_dns_subdomain(p)) {
        return Err(format!(
            "{key:?} has an invalid prefix; it must be a lowercase DNS subdomain"
        ));
    }
    if name.is_empty() {
        return Err(format!("{key:?} has an empty name"));
    }
    validate_label_value(name).map_err(|e| format!("key {e}"))
}

/// An RFC 1123 DNS label: 1 to 63 of `[a-z0-9-]`, no `-` at either end
/// (Service and namespace names).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 DNS subdomain: dot-separated DNS labels, at most 253
/// characters (ConfigMap names, label key prefixes, cluster domains).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A tag made valid for use as a label value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanitizedTag {
    /// The valid label value.
    pub value: String,
    /// True when `value` differs from the input (the user gets a warning).
    pub changed: bool,
}

/// Turns `tag` into a valid label value, deterministically: every character
/// outside `[A-Za-z0-9._-]` becomes `-`, non-alphanumerics are trimmed from
/// both ends, and a result longer than 63 characters is cut and given a
/// stable hash suffix (`-` + 8 hex digits of FNV-1a over the original), so
/// two long branch names that share a prefix stay distinct.
///
/// Returns `None` when nothing usable is left (no letter or digit).
pub fn sanitize_tag(tag: &str) -> Option<SanitizedTag> {
    let replaced: String = tag
        .chars()
        .map(|c| if is_value_char(c) { c } else { '-' })
        .collect();
    let trimmed = replaced.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        return None;
    }
    let value = if trimmed.len() <= MAX_VALUE_LEN {
        trimmed.to_owned()
    } else {
        // All characters are ASCII here, so byte slicing is safe.
        let keep = &trimmed[..MAX_VALUE_LEN - HASH_LEN - 1];
        let keep = keep.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
        format!("{keep}-{:08x}", fnv1a32(tag.as_bytes()))
    };
    Some(SanitizedTag {
        changed: value != tag,
        value,
    })
}

/// FNV-1a, 32 bits: tiny, and stable across releases and platforms (unlike
/// `std`'s hasher), so the same branch always gets the same label.
pub(crate) fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_tags_are_kept() {
        for tag in ["v2", "feature-login", "a", "release_1.4.0", &"x".repeat(63)] {
            let s = sanitize_tag(tag).unwrap();
            assert_eq!(s.value, tag);
            assert!(!s.changed);
        }
    }

    #[test]
    fn branch_names_are_made_valid() {
        let s = sanitize_tag("feature/Login_v2").unwrap();
        assert_eq!(s.value, "feature-Login_v2");
        assert!(s.changed);
        assert_eq!(sanitize_tag("-/-hotfix #12-").unwrap().value, "hotfix--12");
        assert_eq!(sanitize_tag("ünïcode").unwrap().value, "n-code");
    }

    #[test]
    fn long_tags_get_a_stable_hash_suffix() {
        let long = format!("feature/{}", "a".repeat(80));
        let s = sanitize_tag(&long).unwrap();
        assert_eq!(s.value.len(), 63);
        assert!(validate_label_value(&s.value).is_ok());
        assert_eq!(s, sanitize_tag(&long).unwrap(), "deterministic");
        let other = sanitize_tag(&format!("feature/{}b", "a".repeat(80))).unwrap();
        assert_ne!(s.value, other.value, "same prefix, different tags");
        assert_eq!(&s.value[..9], "feature-a");
    }

    #[test]
    fn cut_point_never_leaves_a_dash_before_the_hash() {
        // Position 53 (the last kept character) is a '-'.
        let tag = format!("{}-{}", "a".repeat(53), "b".repeat(30));
        let s = sanitize_tag(&tag).unwrap();
        assert!(validate_label_value(&s.value).is_ok(), "{}", s.value);
        assert!(!s.value.contains("--"), "{}", s.value);
    }

    #[test]
    fn nothing_usable_is_none() {
        for tag in ["", "///", "-_-", "..", "日本"] {
            assert_eq!(sanitize_tag(tag), None, "{tag:?}");
        }
    }

    #[test]
    fn fnv_is_the_published_function() {
        // Reference values of FNV-1a 32.
        assert_eq!(fnv1a32(b""), 0x811c9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9cf968);
    }

    #[test]
    fn label_values_are_checked() {
        assert!(validate_label_value("").is_ok());
        assert!(validate_label_value("gray").is_ok());
        assert!(validate_label_value("-gray").is_err());
        assert!(validate_label_value("gr/ay").is_err());
        assert!(validate_label_value(&"x".repeat(64)).is_err());
    }

    #[test]
    fn dns_names() {
        for ok in ["canary-injector", "a", "a1", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("cluster.local"));
        for bad in ["", "a..b", ".a", "a.", "A.b", &"a.".repeat(127)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn label_keys_are_checked() {
        for ok in [
            "stage",
            "canary-injector.io/tag",
            "app.kubernetes.io/name",
            "a_b.c",
        ] {
            assert!(validate_label_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "Example.com/x",
            "a/b/c",
            "x/",
            "-x",
            "has space",
            "a..b/x",
        ] {
            assert!(validate_label_key(bad).is_err(), "{bad}");
        }
    }
}
