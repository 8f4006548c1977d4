//! Routes people can shape, pure: a canary's share of the requests without
//! a header (the weighted gray stage, from its pods' annotation
//! [`WEIGHT_ANNOTATION`]) and a Service's timeout and retries (its
//! annotations [`TIMEOUT_ANNOTATION`] and [`RETRIES_ANNOTATION`], else
//! `routes.timeout` / `routes.retries`). The controller, `routes -f` and
//! `check` all read them here.
//!
//! ```text
//!  ready pods of tag t --pod_weight()--> WeightTally --> TagWeight (or none)
//!  live tags with a subset + their TagWeights --split()--> default route:
//!      [normal: 100 - sum, t1: w1, t2: w2 ...]   (sum <= 100; else Err(sum))
//!  Service annotations + defaults --route_settings()--> timeout, retries
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Pod annotation: the percent (`0`..`100`) of requests without a canary
/// header that go to this pod's canary while it is live and a normal pod is
/// ready. Set it in the gray workload's pod template.
pub const WEIGHT_ANNOTATION: &str = "canary-injector.io/weight";

/// Service annotation: the timeout of every generated route (a Go
/// duration, e.g. `5s`, `1m30s`, `500ms`).
pub const TIMEOUT_ANNOTATION: &str = "canary-injector.io/route-timeout";

/// Service annotation: the retries of every generated route, `<attempts>`
/// or `<attempts>/<per-try timeout>` (e.g. `3/2s`).
pub const RETRIES_ANNOTATION: &str = "canary-injector.io/route-retries";

/// Most retries a route may ask for.
pub const MAX_ATTEMPTS: u32 = 100;

// === weights ===

/// What one pod's [`WEIGHT_ANNOTATION`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodWeight {
    /// A percent, `0`..=`100`.
    Percent(u8),
    /// Anything else, as written.
    Invalid(String),
}

/// The weight annotation among a pod's annotations, if it has one.
pub fn pod_weight(annotations: Option<&BTreeMap<String, String>>) -> Option<PodWeight> {
    let value = annotations?.get(WEIGHT_ANNOTATION)?;
    Some(match value.trim().parse::<u8>() {
        Ok(p) if p <= 100 && value.trim() == value => PodWeight::Percent(p),
        _ => PodWeight::Invalid(value.clone()),
    })
}

/// Why a canary's weight cannot be used (it counts as 0).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum WeightProblem {
    /// A value that is not an integer from 0 to 100.
    NotAPercent(String),
    /// Its ready pods say different percents.
    Differs(BTreeSet<u8>),
}

impl fmt::Display for WeightProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAPercent(v) => write!(
                f,
                "annotation {WEIGHT_ANNOTATION}: {v:?} is not an integer from 0 to 100"
            ),
            Self::Differs(values) => {
                let list: Vec<String> = values.iter().map(u8::to_string).collect();
                write!(
                    f,
                    "annotation {WEIGHT_ANNOTATION}: its ready pods say different percents ({})",
                    list.join(", ")
                )
            }
        }
    }
}

/// The weight of one canary tag, from its ready pods.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum TagWeight {
    /// Every ready pod says this percent.
    Percent(u8),
    /// Unusable: counts as 0, and is reported on the workload.
    Invalid(WeightProblem),
}

impl TagWeight {
    /// The percent it counts as.
    pub fn percent(&self) -> u8 {
        match self {
            Self::Percent(p) => *p,
            Self::Invalid(_) => 0,
        }
    }
}

/// The weight annotations of one tag's ready pods, summed up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightTally {
    percents: BTreeSet<u8>,
    invalid: Option<String>,
    unset: bool,
}

impl WeightTally {
    /// Adds one ready pod's annotation (`None`: it has none).
    pub fn add(&mut self, weight: Option<&PodWeight>) {
        match weight {
            Some(PodWeight::Percent(p)) => {
                self.percents.insert(*p);
            }
            Some(PodWeight::Invalid(v)) => {
                self.invalid.get_or_insert_with(|| v.clone());
            }
            None => self.unset = true,
        }
    }

    /// The tag's weight: `None` when no pod has the annotation, or while
    /// only some have it (a rollout that adds or removes it: no share until
    /// every ready pod agrees, quietly).
    pub fn weight(&self) -> Option<TagWeight> {
        if let Some(v) = &self.invalid {
            return Some(TagWeight::Invalid(WeightProblem::NotAPercent(v.clone())));
        }
        match self.percents.len() {
            0 => None,
            1 if self.unset => None,
            1 => self.percents.first().map(|p| TagWeight::Percent(*p)),
            _ => Some(TagWeight::Invalid(WeightProblem::Differs(
                self.percents.clone(),
            ))),
        }
    }
}

/// The weighted default route: for each of `routed` (tags whose subset
/// exists and that are live, in order) with a weight above 0, its percent.
/// `Err(sum)` when the percents add up to more than 100.
pub fn split<'t>(
    routed: impl IntoIterator<Item = &'t str>,
    weights: &BTreeMap<String, TagWeight>,
) -> Result<Vec<(&'t str, u8)>, u32> {
    let shares: Vec<(&str, u8)> = routed
        .into_iter()
        .filter_map(|t| Some((t, weights.get(t)?.percent())))
        .filter(|(_, p)| *p > 0)
        .collect();
    let sum: u32 = shares.iter().map(|(_, p)| u32::from(*p)).sum();
    if sum > 100 { Err(sum) } else { Ok(shares) }
}

// === timeout and retries ===

/// Istio's `retries` of an HTTP route, as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Attempts (`0`: no retries).
    #[serde(default)]
    pub attempts: u32,
    /// The timeout of each attempt, as Istio writes durations (`2s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
}

/// What every generated route of a Service gets besides its destination.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteSettings {
    /// `timeout`, as Istio writes durations.
    pub timeout: Option<String>,
    /// `retries`.
    pub retries: Option<Retries>,
}

/// A route setting that cannot be used: the routes are written without it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {value:?} {reason}")]
pub struct InvalidSetting {
    /// The annotation (or config key) it came from.
    pub annotation: &'static str,
    /// The value given.
    pub value: String,
    /// What is wrong, and what is expected.
    pub reason: String,
}

/// A duration as Istio's API writes it (protobuf JSON: seconds with a
/// fraction, `0.5s`, `90s`), from a Go duration; at least a millisecond.
pub fn istio_duration(go: &str) -> Result<String, String> {
    let d = crate::duration::parse(go).map_err(|e| {
        format!("is not a duration ({e}); use a Go duration such as 5s, 1m30s or 500ms")
    })?;
    if d < Duration::from_millis(1) {
        return Err("is shorter than a millisecond".into());
    }
    let nanos = d.subsec_nanos();
    Ok(if nanos == 0 {
        format!("{}s", d.as_secs())
    } else {
        let fraction = format!("{nanos:09}");
        format!("{}.{}s", d.as_secs(), fraction.trim_end_matches('0'))
    })
}

/// Reads `<attempts>` or `<attempts>/<per-try timeout>`.
pub fn parse_retries(value: &str) -> Result<Retries, String> {
    let (attempts, per_try) = match value.split_once('/') {
        Some((a, t)) => (a, Some(t)),
        None => (value, None),
    };
    let attempts: u32 = attempts
        .parse()
        .ok()
        .filter(|a| *a <= MAX_ATTEMPTS)
        .ok_or_else(|| {
            format!(
                "is not <attempts> or <attempts>/<per-try timeout> with attempts from 0 to \
                 {MAX_ATTEMPTS} (e.g. 3 or 3/2s)"
            )
        })?;
    let per_try_timeout = per_try
        .map(|t| istio_duration(t).map_err(|e| format!("has a per-try timeout that {e}")))
        .transpose()?;
    Ok(Retries {
        attempts,
        per_try_timeout,
    })
}

/// The settings of a Service's routes: its annotations, else `defaults`
/// (`routes.timeout`, `routes.retries`, already checked). An annotation
/// that does not read is reported and left out (the default does not
/// stand in for it: what the Service asked for is unclear).
pub fn route_settings(
    annotations: Option<&BTreeMap<String, String>>,
    defaults: &RouteSettings,
) -> (RouteSettings, Vec<InvalidSetting>) {
    let mut invalid = Vec::new();
    let get = |key: &str| annotations.and_then(|a| a.get(key));
    let timeout = match get(TIMEOUT_ANNOTATION) {
        None => defaults.timeout.clone(),
        Some(v) => istio_duration(v)
            .map_err(|reason| {
                invalid.push(InvalidSetting {
                    annotation: TIMEOUT_ANNOTATION,
                    value: v.clone(),
                    reason,
                });
            })
            .ok(),
    };
    let retries = match get(RETRIES_ANNOTATION) {
        None => defaults.retries.clone(),
        Some(v) => parse_retries(v)
            .map_err(|reason| {
                invalid.push(InvalidSetting {
                    annotation: RETRIES_ANNOTATION,
                    value: v.clone(),
                    reason,
                });
            })
            .ok(),
    };
    (RouteSettings { timeout, retries }, invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_pod_weight_is_a_percent_or_invalid() {
        let w = |v: &str| pod_weight(Some(&annotations(&[(WEIGHT_ANNOTATION, v)])));
        assert_eq!(w("10"), Some(PodWeight::Percent(10)));
        assert_eq!(w("0"), Some(PodWeight::Percent(0)));
        assert_eq!(w("100"), Some(PodWeight::Percent(100)));
        for bad in ["101", "-1", "10%", "ten", "", " 5", "1.5"] {
            assert_eq!(w(bad), Some(PodWeight::Invalid(bad.into())), "{bad:?}");
        }
        assert_eq!(pod_weight(None), None);
        assert_eq!(pod_weight(Some(&annotations(&[("other", "1")]))), None);
    }

    #[test]
    fn a_tags_weight_needs_every_ready_pod_to_agree() {
        let tally = |ws: &[Option<PodWeight>]| {
            let mut t = WeightTally::default();
            for w in ws {
                t.add(w.as_ref());
            }
            t.weight()
        };
        use PodWeight::{Invalid, Percent};
        assert_eq!(tally(&[]), None);
        assert_eq!(tally(&[None, None]), None);
        assert_eq!(
            tally(&[Some(Percent(10)), Some(Percent(10))]),
            Some(TagWeight::Percent(10))
        );
        // Mid-rollout (some pods have it, some not): no share yet, quietly.
        assert_eq!(tally(&[Some(Percent(10)), None]), None);
        assert_eq!(
            tally(&[Some(Percent(10)), Some(Percent(20))]),
            Some(TagWeight::Invalid(WeightProblem::Differs(BTreeSet::from(
                [10, 20]
            ))))
        );
        let bad = tally(&[Some(Percent(10)), Some(Invalid("x".into()))]);
        assert_eq!(
            bad,
            Some(TagWeight::Invalid(WeightProblem::NotAPercent("x".into())))
        );
        assert_eq!(bad.unwrap().percent(), 0);
        assert_eq!(
            WeightProblem::Differs(BTreeSet::from([10, 20])).to_string(),
            "annotation canary-injector.io/weight: its ready pods say different percents (10, 20)"
        );
    }

    #[test]
    fn the_split_adds_up_or_says_by_how_much_it_does_not() {
        let weights = BTreeMap::from([
            ("a".to_owned(), TagWeight::Percent(10)),
            ("b".to_owned(), TagWeight::Percent(0)),
            (
                "c".to_owned(),
                TagWeight::Invalid(WeightProblem::NotAPercent("x".into())),
            ),
            ("d".to_owned(), TagWeight::Percent(95)),
        ]);
        assert_eq!(split(["a", "b", "c", "e"], &weights), Ok(vec![("a", 10)]));
        assert_eq!(split(["a", "d"], &weights), Err(105));
        assert_eq!(split(["d"], &weights), Ok(vec![("d", 95)]));
        assert_eq!(split([], &weights), Ok(vec![]));
    }

    #[test]
    fn durations_are_written_as_istio_reads_them() {
        assert_eq!(istio_duration("5s").unwrap(), "5s");
        assert_eq!(istio_duration("500ms").unwrap(), "0.5s");
        assert_eq!(istio_duration("1m30s").unwrap(), "90s");
        assert_eq!(istio_duration("1.25s").unwrap(), "1.25s");
        assert!(istio_duration("0").is_err());
        assert!(istio_duration("100us").unwrap_err().contains("millisecond"));
        assert!(istio_duration("5").unwrap_err().contains("not a duration"));
        assert!(istio_duration("-1s").is_err());
    }

    #[test]
    fn retries_read_attempts_and_a_per_try_timeout() {
        assert_eq!(
            parse_retries("3").unwrap(),
            Retries {
                attempts: 3,
                per_try_timeout: None
            }
        );
        assert_eq!(
            parse_retries("2/500ms").unwrap(),
            Retries {
                attempts: 2,
                per_try_timeout: Some("0.5s".into())
            }
        );
        for bad in ["", "x", "-1", "101", "3/", "3/x", "3/2s/1"] {
            assert!(parse_retries(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn annotations_win_over_the_defaults_and_a_bad_one_is_left_out() {
        let defaults = RouteSettings {
            timeout: Some("10s".into()),
            retries: Some(Retries {
                attempts: 1,
                per_try_timeout: None,
            }),
        };
        let (s, bad) = route_settings(None, &defaults);
        assert_eq!((s, bad), (defaults.clone(), vec![]));
        let a = annotations(&[(TIMEOUT_ANNOTATION, "2s"), (RETRIES_ANNOTATION, "lots")]);
        let (s, bad) = route_settings(Some(&a), &defaults);
        assert_eq!(s.timeout.as_deref(), Some("2s"));
        assert_eq!(s.retries, None, "never half of what was asked");
        assert_eq!(bad.len(), 1);
        assert_eq!(
            bad[0].to_string(),
            "annotation canary-injector.io/route-retries: \"lots\" is not <attempts> or \
             <attempts>/<per-try timeout> with attempts from 0 to 100 (e.g. 3 or 3/2s)"
        );
    }
}
