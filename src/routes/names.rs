//! Subset names for canary tags.
//!
//! Istio requires a DestinationRule subset name to be a DNS-1123 label
//! (`[a-z0-9-]`, at most 63, alphanumeric at both ends); a tag is a label
//! value (`[A-Za-z0-9._-]`, up to 63, capitals allowed). The mapping:
//!
//! - a tag that already is a DNS-1123 label, is not [`NORMAL_SUBSET`] and
//!   holds no `--` is its own subset name (`feature-login` -> `feature-login`);
//! - any other tag gets a readable part (lowercased; every run of other
//!   characters becomes one `-`; cut to 53 characters) plus `--` and 8 hex
//!   digits of the FNV-1a hash of the whole tag (`Feature_Login` ->
//!   `feature-login--6c5f0e38`).
//!
//! So a name made from a hash always holds `--` and a kept tag never does:
//! the two kinds cannot collide, and two hashed names only collide when
//! both the readable part and 32 bits of hash agree. [`assign_names`]
//! resolves even that (and keeps every name a subset already has), so
//! within one DestinationRule the names are unique, and a tag's name never
//! changes while its subset exists.

use std::collections::{BTreeMap, BTreeSet};

use crate::mutate::labels::{fnv1a32, is_dns_label};

/// The subset of the normal stage; reserved (a tag `normal` gets a hashed
/// name).
pub const NORMAL_SUBSET: &str = "normal";

/// Separates the readable part of a hashed name from its hash.
const MARK: &str = "--";

/// Longest subset name (a DNS-1123 label).
const MAX_LEN: usize = 63;

/// Longest readable part of a hashed name: room for `--` and 8 hex digits.
const READABLE_LEN: usize = MAX_LEN - MARK.len() - 8;

/// The subset name of `tag` (see the module docs). Depends on the tag
/// alone; [`assign_names`] uses it unless that name is taken.
pub fn subset_name(tag: &str) -> String {
    if is_dns_label(tag) && tag != NORMAL_SUBSET && !tag.contains(MARK) {
        tag.to_owned()
    } else {
        hashed(tag, 0)
    }
}

/// The readable part of `tag` plus `--` and a hash of the tag (salted with
/// `salt` when it is not 0, to step past a collision).
fn hashed(tag: &str, salt: u32) -> String {
    let mut readable = String::with_capacity(READABLE_LEN);
    for c in tag.chars() {
        if readable.len() == READABLE_LEN {
            break;
        }
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            readable.push(c);
        } else if !readable.is_empty() && !readable.ends_with('-') {
            readable.push('-');
        }
    }
    let readable = readable.trim_end_matches('-');
    let readable = if readable.is_empty() { "tag" } else { readable };
    let hash = if salt == 0 {
        fnv1a32(tag.as_bytes())
    } else {
        fnv1a32(format!("{tag}\0{salt}").as_bytes())
    };
    format!("{readable}{MARK}{hash:08x}")
}

/// Subset names for `tags` (tag -> name), unique within the set and never
/// [`NORMAL_SUBSET`]. A tag listed in `existing` (what a DestinationRule
/// already holds) keeps its name when that name is a valid, untaken subset
/// name; every other tag gets [`subset_name`], or on a collision (in tag
/// order) the next salted hash. The result does not depend on the order of
/// `tags`.
pub fn assign_names<'a>(
    tags: impl IntoIterator<Item = &'a str>,
    existing: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let tags: BTreeSet<&str> = tags.into_iter().collect();
    let mut taken = BTreeSet::from([NORMAL_SUBSET.to_owned()]);
    let mut names = BTreeMap::new();
    for tag in &tags {
        if let Some(name) = existing.get(*tag)
            && is_dns_label(name)
            && !taken.contains(name)
        {
            taken.insert(name.clone());
            names.insert((*tag).to_owned(), name.clone());
        }
    }
    for tag in tags {
        if names.contains_key(tag) {
            continue;
        }
        let mut name = subset_name(tag);
        let mut salt = 0;
        while taken.contains(&name) {
            salt += 1;
            name = hashed(tag, salt);
        }
        taken.insert(name.clone());
        names.insert(tag.to_owned(), name);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_are_their_own_names() {
        for tag in ["feature-login", "v2", "1-5-0", "a", &"x".repeat(63)] {
            assert_eq!(subset_name(tag), tag);
        }
    }

    #[test]
    fn other_tags_get_a_readable_part_and_a_hash() {
        let cases = [
            ("Feature_Login", "feature-login--"),
            ("release.2024.06", "release-2024-06--"),
            ("feature__x", "feature-x--"),
            ("UPPER", "upper--"),
            ("normal", "normal--"),
            ("a--b", "a-b--"),
        ];
        for (tag, prefix) in cases {
            let name = subset_name(tag);
            assert!(name.starts_with(prefix), "{tag} -> {name}");
            assert_eq!(name.len(), prefix.len() + 8, "{tag} -> {name}");
            assert!(is_dns_label(&name), "{name}");
            assert_eq!(subset_name(tag), name, "stable");
        }
        assert_ne!(subset_name("Feature_Login"), subset_name("feature_login"));
    }

    #[test]
    fn long_tags_fit_in_63_characters() {
        let tag = format!("{}_x", "Long".repeat(15));
        let name = subset_name(&tag);
        assert_eq!(name.len(), 63, "{name}");
        assert!(is_dns_label(&name), "{name}");
        // The same 53 readable characters, different hashes.
        assert_ne!(subset_name(&format!("{}_y", "Long".repeat(15))), name);
    }

    #[test]
    fn a_tag_that_looks_like_a_hashed_name_is_hashed_itself() {
        let hashed = subset_name("Feature_Login");
        assert!(hashed.contains("--"));
        let again = subset_name(&hashed);
        assert_ne!(again, hashed, "a tag never takes a hashed name");
        let names = assign_names(["Feature_Login", hashed.as_str()], &BTreeMap::new());
        let unique: BTreeSet<&String> = names.values().collect();
        assert_eq!(unique.len(), 2);
    }

    #[test]
    fn existing_names_are_kept_and_collisions_step_aside() {
        // A DestinationRule written earlier gave `a` the name `b`.
        let existing = BTreeMap::from([("a".to_owned(), "b".to_owned())]);
        let names = assign_names(["a", "b"], &existing);
        assert_eq!(names["a"], "b");
        assert!(names["b"].starts_with("b--"), "{names:?}");
        // Invalid or reserved existing names are not kept.
        let existing = BTreeMap::from([
            ("x".to_owned(), "Not_Valid".to_owned()),
            ("y".to_owned(), NORMAL_SUBSET.to_owned()),
        ]);
        let names = assign_names(["x", "y"], &existing);
        assert_eq!(names["x"], "x");
        assert_eq!(names["y"], "y");
    }

    #[test]
    fn assignment_does_not_depend_on_order() {
        let existing = BTreeMap::new();
        let a = assign_names(["b", "A_1", "c", "a-1"], &existing);
        let b = assign_names(["a-1", "c", "A_1", "b"], &existing);
        assert_eq!(a, b);
    }
}
