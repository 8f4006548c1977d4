//! The CEL of the native policy: the webhook's label rules
//! ([`crate::mutate::decide`]) written as CEL variables, one JSONPatch
//! mutation, one validation and the match conditions, with the label
//! vocabulary of the configuration baked in as string literals.
//!
//! Every expression sticks to what Kubernetes 1.34+ CEL offers everywhere:
//! the standard macros (`has`, `exists`, `filter`, `map`), `matches`, the
//! Kubernetes regex library (`find`, `findAll`), the strings extension's
//! `join`, and the `JSONPatch` type of mutating admission policies. No
//! optionals, no bitwise arithmetic, no loops: which is why the one rule that
//! needs a hash (a tag cut to 63 characters gets 8 hex digits of FNV-1a) is
//! left to the webhook ([`TAG_FITS`]).
//!
//! Absent values are lists of zero or one element (`[]` / `['v2']`), and
//! absent maps are `{}`, so every variable is defined for every kind and
//! nothing is read that is not there (an error would fail the request).

use crate::mutate::MIRROR_POD_ANNOTATION;
use crate::mutate::labels::MAX_VALUE_LEN;
use crate::mutate::policy::LabelPolicy;

/// Name of the match condition that hands an object with a tag annotation
/// longer than a label value to the webhook.
pub const TAG_FITS: &str = "tag-fits-a-label";

/// A CEL string literal: single-quoted, with `\` and `'` escaped (label
/// keys and values never hold either, but the function does not rely on it).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A map key as one RFC 6901 JSON Pointer token (`~` as `~0`, `/` as `~1`):
/// what `jsonpatch.escapeKey` does, done here once for the constant keys.
pub fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// One named CEL expression (a variable or a match condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// The name.
    pub name: &'static str,
    /// The expression.
    pub expression: String,
}

fn named(name: &'static str, expression: String) -> Named {
    Named { name, expression }
}

/// The variables both policies use: what the object means, as
/// [`crate::mutate::decide`] reads it at admission. In dependency order
/// (a variable refers only to earlier ones).
pub fn variables(labels: &LabelPolicy) -> Vec<Named> {
    let tag_key = quote(&labels.tag_annotation);
    let canary = quote(&labels.canary_tag);
    let stage = quote(&labels.stage);
    let normal = quote(&labels.normal_stage);
    let gray = quote(&labels.gray_stage);
    vec![
        // Pods and ReplicaSets carry labels; workloads get their tag
        // annotation copied into their pod template instead.
        named(
            "labelsOnObject",
            "object.kind == 'Pod' || object.kind == 'ReplicaSet'".into(),
        ),
        named(
            "hasTemplate",
            "object.kind == 'CronJob'\n  \
             ? has(object.spec) && has(object.spec.jobTemplate)\n    \
             && has(object.spec.jobTemplate.spec) && has(object.spec.jobTemplate.spec.template)\n  \
             : object.kind != 'Pod' && has(object.spec) && has(object.spec.template)"
                .into(),
        ),
        named(
            "template",
            "!variables.hasTemplate ? {}\n  \
             : object.kind == 'CronJob' ? object.spec.jobTemplate.spec.template : object.spec.template"
                .into(),
        ),
        named(
            "templatePath",
            "object.kind == 'CronJob' ? '/spec/jobTemplate/spec/template' : '/spec/template'".into(),
        ),
        named(
            "templateMeta",
            "has(variables.template.metadata) ? variables.template.metadata : {}".into(),
        ),
        named(
            "templateLabels",
            "has(variables.templateMeta.labels) ? variables.templateMeta.labels : {}".into(),
        ),
        named(
            "templateTag",
            format!(
                "has(variables.templateMeta.annotations) && {tag_key} in variables.templateMeta.annotations\n  \
                 ? [variables.templateMeta.annotations[{tag_key}]] : []"
            ),
        ),
        named(
            "objectLabels",
            "variables.labelsOnObject && has(object.metadata.labels) ? object.metadata.labels : {}"
                .into(),
        ),
        named(
            "objectTag",
            format!(
                "has(object.metadata.annotations) && {tag_key} in object.metadata.annotations\n  \
                 ? [object.metadata.annotations[{tag_key}]] : []"
            ),
        ),
        // A pod template a controller owns is never changed, and it speaks
        // for the object: its pods are created from it.
        named(
            "owned",
            "variables.hasTemplate && has(object.metadata.ownerReferences)\n  \
             && object.metadata.ownerReferences.exists(r, has(r.controller) && r.controller)"
                .into(),
        ),
        // Existing labels win; the first map that has one speaks for all.
        named(
            "sources",
            "variables.owned ? [variables.templateLabels, variables.objectLabels]\n  \
             : [variables.objectLabels, variables.templateLabels]"
                .into(),
        ),
        named(
            "existingTag",
            format!(
                "variables.sources.exists(m, {canary} in m)\n  \
                 ? [variables.sources.filter(m, {canary} in m)[0][{canary}]] : []"
            ),
        ),
        named(
            "existingStage",
            format!(
                "variables.sources.exists(m, {stage} in m)\n  \
                 ? [variables.sources.filter(m, {stage} in m)[0][{stage}]] : []"
            ),
        ),
        // The tag asked for: an owned object's template first, then its own
        // metadata (a Deployment copies its annotations onto its
        // ReplicaSets: labelled as their pods, whose owner chain finds it);
        // anything else's own, then its template's.
        named(
            "requested",
            "variables.owned\n  \
             ? (size(variables.templateTag) > 0 ? variables.templateTag : variables.objectTag)\n  \
             : (size(variables.objectTag) > 0 ? variables.objectTag : variables.templateTag)"
                .into(),
        ),
        // That tag is on an owned object's own metadata: a controller
        // created it, so an unusable one never refuses it.
        named(
            "ownersTag",
            "variables.owned && size(variables.templateTag) == 0 && size(variables.objectTag) > 0"
                .into(),
        ),
        named(
            "tagIgnored",
            format!("size(variables.existingTag) == 0 && variables.existingStage == [{normal}]"),
        ),
        // No letter or digit to make a label value of: no labels.
        named(
            "unusableTag",
            "(variables.labelsOnObject || variables.hasTemplate) && size(variables.existingTag) == 0\n  \
             && !variables.tagIgnored && size(variables.requested) > 0\n  \
             && !variables.requested[0].matches('[A-Za-z0-9]')"
                .into(),
        ),
        // ... and refused, unless its controller created it.
        named(
            "unusable",
            "variables.unusableTag && !variables.ownersTag".into(),
        ),
        // The tag made a label value: every character outside
        // [A-Za-z0-9._-] becomes '-', then anything but a letter or digit
        // is trimmed from both ends. (Longer than 63 characters: the
        // webhook's, see the match condition.)
        named(
            "tag",
            "size(variables.existingTag) > 0 ? variables.existingTag\n  \
             : variables.tagIgnored || size(variables.requested) == 0 ? []\n  \
             : [variables.requested[0].findAll('[A-Za-z0-9._-]+|[^A-Za-z0-9._-]')\n      \
             .map(s, s.matches('^[A-Za-z0-9._-]') ? s : '-').join('')\n      \
             .find('[A-Za-z0-9](?:.*[A-Za-z0-9])?')]"
                .into(),
        ),
        named(
            "stage",
            format!(
                "size(variables.existingStage) > 0 ? variables.existingStage[0]\n  \
                 : size(variables.tag) > 0 ? {gray} : {normal}"
            ),
        ),
        named(
            "newLabels",
            format!(
                "size(variables.tag) > 0 ? {{{canary}: variables.tag[0], {stage}: variables.stage}}\n  \
                 : {{{stage}: variables.stage}}"
            ),
        ),
        // A standalone ReplicaSet's template is labelled too (its pods are
        // created from it); an owned one's never (kubernetes#57167).
        named(
            "labelTemplate",
            "variables.labelsOnObject && variables.hasTemplate && !variables.owned".into(),
        ),
        // A workload's own tag reaches its pod template (the workload's
        // value wins; an owned workload's template is its controller's).
        named(
            "copyTag",
            "!variables.labelsOnObject && variables.hasTemplate && !variables.owned\n  \
             && size(variables.objectTag) > 0 && variables.templateTag != variables.objectTag\n  \
             && !variables.unusableTag"
                .into(),
        ),
    ]
}

/// The variables the validating policy needs: those [`variables`] up to
/// `unusable` (no label values are computed there).
pub fn validation_variables(labels: &LabelPolicy) -> Vec<Named> {
    let mut all = variables(labels);
    let end = all
        .iter()
        .position(|v| v.name == "unusable")
        .map_or(0, |i| i + 1);
    all.truncate(end);
    all
}

/// The JSONPatch mutation: the missing labels (never one that is set),
/// and a workload's tag into its pod template. Nothing when the tag is
/// unusable: the validating policy refuses that.
pub fn mutation(labels: &LabelPolicy) -> String {
    let canary = quote(&labels.canary_tag);
    let stage = quote(&labels.stage);
    let tag_key = quote(&labels.tag_annotation);
    let canary_token = pointer_token(&labels.canary_tag);
    let stage_token = pointer_token(&labels.stage);
    let tag_token = pointer_token(&labels.tag_annotation);
    let add =
        |path: &str, value: &str| format!("JSONPatch{{op: 'add', path: {path}, value: {value}}}");
    let per_key = |map: &str, prefix: &str| {
        format!(
            "(size(variables.tag) > 0 && !({canary} in {map})\n        \
             ? [{}] : [])\n      \
             + (!({stage} in {map})\n        \
             ? [{}] : [])",
            add(
                &quote(&format!("{prefix}/{canary_token}")),
                "variables.tag[0]"
            ),
            add(
                &quote(&format!("{prefix}/{stage_token}")),
                "variables.stage"
            ),
        )
    };
    let template_tag_path = format!(
        "variables.templatePath + {}",
        quote(&format!("/metadata/annotations/{tag_token}"))
    );
    format!(
        "variables.unusableTag ? [] :\n\
         (variables.labelsOnObject\n  \
         ? (has(object.metadata.labels)\n      \
         ? {object_keys}\n      \
         : [{object_map}])\n  \
         : [])\n\
         + (variables.labelTemplate\n  \
         ? (!has(variables.template.metadata)\n      \
         ? [{template_meta}]\n    \
         : !has(variables.templateMeta.labels)\n      \
         ? [{template_map}]\n    \
         : {template_keys})\n  \
         : [])\n\
         + (variables.copyTag\n  \
         ? (!has(variables.template.metadata)\n      \
         ? [{copy_meta}]\n    \
         : !has(variables.templateMeta.annotations)\n      \
         ? [{copy_map}]\n    \
         : size(variables.templateTag) > 0\n      \
         ? [JSONPatch{{op: 'replace', path: {template_tag_path}, value: variables.objectTag[0]}}]\n    \
         : [{copy_add}])\n  \
         : [])",
        object_keys = per_key("object.metadata.labels", "/metadata/labels"),
        object_map = add("'/metadata/labels'", "variables.newLabels"),
        template_meta = add(
            "'/spec/template/metadata'",
            "{'labels': variables.newLabels}"
        ),
        template_map = add("'/spec/template/metadata/labels'", "variables.newLabels"),
        template_keys = per_key(
            "variables.templateMeta.labels",
            "/spec/template/metadata/labels"
        ),
        copy_meta = add(
            "variables.templatePath + '/metadata'",
            &format!("{{'annotations': {{{tag_key}: variables.objectTag[0]}}}}"),
        ),
        copy_map = add(
            "variables.templatePath + '/metadata/annotations'",
            &format!("{{{tag_key}: variables.objectTag[0]}}"),
        ),
        copy_add = add(&template_tag_path, "variables.objectTag[0]"),
    )
}

/// The validation: a tag annotation with no letter or digit is refused
/// (on `CREATE`; the policy matches nothing else).
pub fn validation() -> &'static str {
    "!variables.unusable"
}

/// The refusal's text: [`crate::mutate::Deny::UnusableTag`]'s message
/// (the value quoted plainly, where the webhook uses Rust's escaping: the
/// two differ only for a tag holding `"`, `\` or control characters).
pub fn refusal_message(labels: &LabelPolicy) -> String {
    let before = format!("annotation {}: \"", labels.tag_annotation);
    let after = format!(
        "\" has no letters or digits to use as a canary tag; set it to a name made of \
         [A-Za-z0-9._-] (it becomes the {} label, at most 63 characters)",
        labels.canary_tag
    );
    format!(
        "{} + variables.requested[0] + {}",
        quote(&before),
        quote(&after)
    )
}

/// The skip rules of [`crate::mutate::decide`] the selectors do not express,
/// as match conditions; `handover` adds [`TAG_FITS`] (the mutating policy
/// leaves long tags to the webhook; the validating one refuses an unusable
/// tag whatever its length).
pub fn match_conditions(labels: &LabelPolicy, handover: bool) -> Vec<Named> {
    let opt_out = quote(&labels.opt_out_label);
    let tag_key = quote(&labels.tag_annotation);
    let mut conditions = vec![
        named(
            "not-a-mirror-pod",
            format!(
                "object.kind != 'Pod' || !has(object.metadata.annotations)\n  \
                 || !({} in object.metadata.annotations)",
                quote(MIRROR_POD_ANNOTATION)
            ),
        ),
        // The objectSelector also matches an UPDATE whose old object
        // carried the label; the webhook reads the new object only.
        named(
            "not-opted-out",
            format!(
                "!has(object.metadata.labels) || !({opt_out} in object.metadata.labels)\n  \
                 || object.metadata.labels[{opt_out}] != 'false'"
            ),
        ),
        named(
            "not-being-deleted",
            "request.operation != 'UPDATE' || !has(object.metadata.deletionTimestamp)".into(),
        ),
    ];
    if handover {
        conditions.push(named(
            TAG_FITS,
            format!(
                "!(object.kind in ['Pod', 'ReplicaSet'])\n  \
                 || ((!has(object.metadata.annotations) || !({tag_key} in object.metadata.annotations)\n      \
                 || size(object.metadata.annotations[{tag_key}]) <= {MAX_VALUE_LEN})\n    \
                 && (!has(object.spec) || !has(object.spec.template) || !has(object.spec.template.metadata)\n      \
                 || !has(object.spec.template.metadata.annotations)\n      \
                 || !({tag_key} in object.spec.template.metadata.annotations)\n      \
                 || size(object.spec.template.metadata.annotations[{tag_key}]) <= {MAX_VALUE_LEN}))"
            ),
        ));
    }
    conditions
}

/// The match condition of the webhook that labels what the policy did not
/// (deploy/native-policy): an object without the stage label after the
/// policy ran (a tag longer than a label value, or no policy at all).
pub fn unlabelled_condition(labels: &LabelPolicy) -> Named {
    let stage = quote(&labels.stage);
    named(
        "not-labelled-by-the-policy",
        format!("!has(object.metadata.labels) || !({stage} in object.metadata.labels)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_pointers_are_escaped() {
        assert_eq!(quote("stage"), "'stage'");
        assert_eq!(quote("it's a \\ path\n"), "'it\\'s a \\\\ path\\n'");
        assert_eq!(pointer_token("example.com/stage"), "example.com~1stage");
        assert_eq!(pointer_token("a~b/c"), "a~0b~1c");
    }

    /// The names an expression reads (`variables.<name>`).
    fn reads(expression: &str) -> Vec<&str> {
        expression
            .split("variables.")
            .skip(1)
            .map(|rest| {
                let end = rest
                    .find(|c: char| !c.is_ascii_alphanumeric())
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect()
    }

    #[test]
    fn variables_refer_only_to_earlier_ones() {
        let vars = variables(&LabelPolicy::default());
        let mut defined: Vec<&str> = Vec::new();
        for v in &vars {
            for name in reads(&v.expression) {
                assert!(
                    defined.contains(&name),
                    "{} reads {name} before it is defined",
                    v.name
                );
            }
            assert!(!defined.contains(&v.name), "{} defined twice", v.name);
            defined.push(v.name);
        }
        let labels = LabelPolicy::default();
        for name in reads(&mutation(&labels))
            .into_iter()
            .chain(reads(&refusal_message(&labels)))
        {
            assert!(
                defined.contains(&name),
                "the mutation reads undefined {name}"
            );
        }
        let needed: Vec<&str> = validation_variables(&labels)
            .iter()
            .map(|v| v.name)
            .collect();
        for name in reads(validation())
            .into_iter()
            .chain(reads(&refusal_message(&labels)))
        {
            assert!(
                needed.contains(&name),
                "the validation reads {name}, which it lacks"
            );
        }
    }

    #[test]
    fn the_validation_needs_only_the_variables_up_to_unusable() {
        let vars = validation_variables(&LabelPolicy::default());
        assert_eq!(vars.last().unwrap().name, "unusable");
        let names: Vec<&str> = vars.iter().map(|v| v.name).collect();
        for used in ["requested", "existingTag", "tagIgnored"] {
            assert!(names.contains(&used), "{used}");
        }
        assert!(!names.contains(&"tag"));
        let message = refusal_message(&LabelPolicy::default());
        assert!(message.contains("variables.requested[0]"));
    }

    #[test]
    fn the_vocabulary_of_the_configuration_is_baked_in() {
        let labels = LabelPolicy {
            canary_tag: "example.com/canary".into(),
            stage: "example.com/stage".into(),
            gray_stage: "canary".into(),
            normal_stage: "stable".into(),
            tag_annotation: "example.com/tag".into(),
            opt_out_label: "example.com/skip".into(),
        };
        let all: String = variables(&labels)
            .iter()
            .map(|v| v.expression.clone())
            .chain([mutation(&labels)])
            .chain(
                match_conditions(&labels, true)
                    .into_iter()
                    .map(|c| c.expression),
            )
            .collect();
        for needle in [
            "'example.com/canary'",
            "'example.com/stage'",
            "'canary'",
            "'stable'",
            "'example.com/tag'",
            "'example.com/skip'",
            "'/metadata/labels/example.com~1canary'",
            "'/spec/template/metadata/labels/example.com~1stage'",
            "'/metadata/annotations/example.com~1tag'",
        ] {
            assert!(all.contains(needle), "{needle} missing");
        }
        for default in ["'canarytag'", "'gray'", "'normal'", "canary-injector.io"] {
            assert!(
                !all.contains(default),
                "{default} is not the configuration's"
            );
        }
        assert_eq!(
            unlabelled_condition(&labels).expression,
            "!has(object.metadata.labels) || !('example.com/stage' in object.metadata.labels)"
        );
    }

    #[test]
    fn parentheses_and_brackets_balance() {
        let labels = LabelPolicy::default();
        let mut exprs: Vec<String> = variables(&labels)
            .into_iter()
            .map(|v| v.expression)
            .collect();
        exprs.push(mutation(&labels));
        exprs.push(refusal_message(&labels));
        exprs.extend(
            match_conditions(&labels, true)
                .into_iter()
                .map(|c| c.expression),
        );
        for e in &exprs {
            let mut depth = Vec::new();
            let mut in_str = false;
            let mut escaped = false;
            for c in e.chars() {
                if in_str {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '\'') => in_str = false,
                        _ => {}
                    }
                    continue;
                }
                match c {
                    '\'' => in_str = true,
                    '(' | '[' | '{' => depth.push(c),
                    ')' => assert_eq!(depth.pop(), Some('('), "{e}"),
                    ']' => assert_eq!(depth.pop(), Some('['), "{e}"),
                    '}' => assert_eq!(depth.pop(), Some('{'), "{e}"),
                    _ => {}
                }
            }
            assert!(depth.is_empty() && !in_str, "unbalanced: {e}");
        }
    }
}
