//! Patch TCP keepalive into the `xds-grpc` cluster of Istio's Envoy bootstrap
//! *template* (`/var/lib/istio/envoy/envoy_bootstrap_tmpl.json`).
//!
//! The template is a Go `text/template` whose output is JSON, so the file
//! itself is not JSON: `{{ if }}`/`{{ end }}` lines sit between members (and
//! may hold a member's trailing comma), directives appear as bare values
//! (`"metadata": {{ .meta_json_str }}`) and inside strings
//! (`"{{ .connect_timeout }}"`). Neither a JSON parser nor a regex can edit it
//! safely, so this module has a small hand-written scanner:
//!
//! 1. `tokenize` splits the text into JSON punctuation, strings, bare words
//!    and Go directives. Directives are opaque tokens (their inner quotes,
//!    braces and `/* comments */` are skipped with Go's lexing rules); inside
//!    a JSON string a directive is just part of the string.
//! 2. `Doc::build` matches braces/brackets with an explicit stack (never
//!    recursion) and records every object member (`"key": value`).
//! 3. [`patch_template`] finds the `static_resources.clusters[]` element with
//!    a direct `"name": "xds-grpc"` member and rewrites only the byte ranges
//!    it must; every other byte (directives, whitespace, CRLF) is kept.

/// TCP keepalive settings to write into the `xds-grpc` cluster: the
/// `bootstrap.keepalive` configuration section itself.
pub use crate::mutate::Keepalive;

/// Why a template could not be patched. `Display` says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// No `static_resources.clusters[]` element is named `xds-grpc`.
    #[error(
        "no cluster named \"xds-grpc\" in static_resources.clusters; \
         pass the istio-proxy envoy bootstrap template"
    )]
    NoXdsGrpc,
    /// Several clusters are named `xds-grpc` (e.g. one per `{{ if }}` branch),
    /// so it is not clear which one to patch.
    #[error(
        "found {count} clusters named \"xds-grpc\" in static_resources.clusters; \
         keep exactly one so it is clear which to patch"
    )]
    MultipleXdsGrpc {
        /// How many `xds-grpc` clusters were found.
        count: usize,
    },
    /// The `xds-grpc` cluster has a `pipe` (Unix socket) address, as in
    /// Istio >= 1.8 where the agent proxies xDS; TCP keepalive does not
    /// apply. The message says what canary-injector does for those versions
    /// instead.
    #[error(
        "the xds-grpc cluster has a pipe address: this is an Istio >= 1.8 template, where \
         Envoy reaches istiod through the agent over a Unix socket, so TCP keepalive does \
         not apply and no template is needed. Instead: Istio 1.8-1.17 needs nothing (the \
         agent pings istiod every 30 s with a 10 s timeout); for Istio 1.18 and newer the \
         webhook sets GRPC_KEEPALIVE_INTERVAL/GRPC_KEEPALIVE_TIMEOUT (from \
         bootstrap.keepalive, 30s/15s) on each sidecar at pod creation, automatically \
         (docs/keepalive.md \"Istio versions\")"
    )]
    PipeAddress,
    /// The `upstream_connection_options` of `xds-grpc` is not a JSON object
    /// literal we can safely edit (e.g. it is a Go directive).
    #[error(
        "upstream_connection_options of the xds-grpc cluster (line {line}) is not a \
         plain JSON object; rewrite it as one so tcp_keepalive can be set"
    )]
    UnsupportedUpstreamOptions {
        /// 1-based line of the `upstream_connection_options` key.
        line: usize,
    },
    /// The input is not (or not a well-formed) Envoy bootstrap template.
    #[error("not an envoy bootstrap template: {reason}")]
    NotABootstrapTemplate {
        /// What is wrong, with a line number where that helps.
        reason: String,
    },
}

/// Result of [`patch_template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patched {
    /// The patched template (equal to the input when `changed` is false).
    pub text: String,
    /// Whether `text` differs from the input; false when the keepalive
    /// values were already exactly the requested ones.
    pub changed: bool,
}

/// The ConfigMap key the sidecar mount reads.
pub const CONFIGMAP_KEY: &str = "envoy_bootstrap_tmpl.json";

/// A ConfigMap manifest (YAML) holding `template` under
/// [`CONFIGMAP_KEY`], ready for `kubectl apply -f -`.
pub fn configmap_manifest(
    name: &str,
    namespace: &str,
    template: &str,
) -> Result<String, serde_saphyr::ser::Error> {
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "canary-injector"},
        },
        "data": {CONFIGMAP_KEY: template},
    });
    serde_saphyr::to_string(&cm)
}

/// Set TCP keepalive on the `xds-grpc` cluster of an Istio bootstrap template.
///
/// Replaces the `tcp_keepalive` value of `upstream_connection_options`, adds
/// `tcp_keepalive` to an existing `upstream_connection_options`, or adds a new
/// `upstream_connection_options` member right after `"name": "xds-grpc"`.
/// Everything else is kept byte for byte. Idempotent: patching the output
/// again with the same values returns it unchanged with `changed: false`.
/// Never panics; malformed input yields [`TemplateError::NotABootstrapTemplate`].
pub fn patch_template(src: &str, ka: Keepalive) -> Result<Patched, TemplateError> {
    let doc = Doc::build(src)?;
    let xds = doc.xds_grpc_cluster()?;
    let node = doc.nodes[xds];
    let (open, close) = (node.open, node.close);

    if doc
        .members
        .iter()
        .any(|m| m.key > open && m.key < close && doc.str_content(m.key) == "pipe")
    {
        return Err(TemplateError::PipeAddress);
    }

    let options: Vec<Member> = doc
        .members_named(xds, "upstream_connection_options")
        .collect();
    check_duplicates(options.len(), "upstream_connection_options")?;
    let mut edits: Vec<Edit> = Vec::new();
    for &uco in &options {
        edits.extend(doc.patch_options(xds, uco, ka)?);
    }
    if options.is_empty() {
        edits.push(doc.insert_options(xds, ka)?);
    }

    let text = apply_edits(src, &mut edits)?;
    let changed = text != src;
    Ok(Patched { text, changed })
}

/// Most copies of one member (e.g. `tcp_keepalive` in several `{{ if }}`
/// branches) that are all patched. Real templates have one; the cap keeps
/// the per-edit line scans from going quadratic on hostile input.
const MAX_DUPLICATES: usize = 8;

/// Refuse more than [`MAX_DUPLICATES`] copies of member `key`.
fn check_duplicates(count: usize, key: &str) -> Result<(), TemplateError> {
    if count > MAX_DUPLICATES {
        return Err(bad(format!(
            "{count} \"{key}\" members in the xds-grpc cluster; expected at most {MAX_DUPLICATES}"
        )));
    }
    Ok(())
}

/// Deepest `{`/`[` nesting accepted. Real templates stay below 20 levels;
/// the limit bounds memory on hostile input.
const MAX_DEPTH: usize = 256;

/// Lexical class of a [`Tok`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    Colon,
    Comma,
    /// A JSON string, quotes included (may contain directives).
    Str,
    /// Number, `true`, `false`, `null` or any other unquoted word.
    Bare,
    /// A Go template action `{{ ... }}` outside any string.
    Directive,
}

/// A token: its kind and byte range `start..end` in the source.
///
/// Every boundary is either the end of the input or an ASCII byte, so both
/// offsets are always `char` boundaries.
#[derive(Debug, Clone, Copy)]
struct Tok {
    kind: TokenKind,
    start: usize,
    end: usize,
}

/// 1-based line number of byte offset `pos`.
fn line_of(src: &str, pos: usize) -> usize {
    let upto = src.as_bytes().get(..pos).unwrap_or(src.as_bytes());
    upto.iter().filter(|&&b| b == b'\n').count() + 1
}

/// Shorthand for a [`TemplateError::NotABootstrapTemplate`].
fn bad(reason: String) -> TemplateError {
    TemplateError::NotABootstrapTemplate { reason }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Find `needle` in `b` at or after `from`; returns its start offset.
fn find(b: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let hay = b.get(from..)?;
    hay.windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Skip a Go action starting at `start` (which holds `{{`); returns the
/// offset just past its closing `}}`.
///
/// Follows Go's lexer closely enough for templates: `"..."` strings with
/// backslash escapes, `` `raw` `` strings and `'c'` runes may contain `}}`,
/// and `{{/* comments */}}` (optionally `{{- /* ... */ -}}`) end only after
/// `*/`.
fn skip_directive(src: &str, start: usize) -> Result<usize, TemplateError> {
    let b = src.as_bytes();
    let unterminated = || {
        bad(format!(
            "unterminated {{{{ directive starting at line {}",
            line_of(src, start)
        ))
    };
    let mut i = start + 2;
    // Comment: `{{/*` or `{{- /*`.
    let mut j = i;
    if b.get(j) == Some(&b'-') {
        j += 1;
    }
    while b.get(j).is_some_and(|&c| is_space(c)) {
        j += 1;
    }
    if b.get(j..j + 2) == Some(b"/*") {
        let close = find(b, j + 2, b"*/").ok_or_else(unterminated)?;
        let end = find(b, close + 2, b"}}").ok_or_else(unterminated)?;
        return Ok(end + 2);
    }
    loop {
        match b.get(i) {
            None => return Err(unterminated()),
            Some(b'}') if b.get(i + 1) == Some(&b'}') => return Ok(i + 2),
            Some(&q @ (b'"' | b'\'')) => {
                // Interpreted string or rune: ends at the same quote, `\`
                // escapes one byte, and a newline means it never closed.
                i += 1;
                loop {
                    match b.get(i) {
                        None | Some(b'\n') => return Err(unterminated()),
                        Some(b'\\') => i += 2,
                        Some(&c) if c == q => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
            }
            Some(b'`') => {
                i = find(b, i + 1, b"`").ok_or_else(unterminated)? + 1;
            }
            Some(_) => i += 1,
        }
    }
}

/// Skip a JSON string starting at `start` (which holds `"`); returns the
/// offset just past the closing quote. Directives inside it are skipped as a
/// whole, so `"{{ printf "%s" .x }}"` is one string.
fn skip_string(src: &str, start: usize) -> Result<usize, TemplateError> {
    let b = src.as_bytes();
    let mut i = start + 1;
    loop {
        match b.get(i) {
            // JSON strings cannot hold a raw newline: report the opening line
            // rather than swallowing the rest of the file.
            None | Some(b'\n') => {
                return Err(bad(format!(
                    "unterminated string starting at line {}",
                    line_of(src, start)
                )));
            }
            Some(b'\\') => i += 2,
            Some(b'"') => return Ok(i + 1),
            Some(b'{') if b.get(i + 1) == Some(&b'{') => i = skip_directive(src, i)?,
            Some(_) => i += 1,
        }
    }
}

/// Split a template into tokens (whitespace is dropped).
fn tokenize(src: &str) -> Result<Vec<Tok>, TemplateError> {
    let b = src.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let (kind, end) = match c {
            _ if is_space(c) => {
                i += 1;
                continue;
            }
            // `{{` is always a Go action: JSON never has `{` right after `{`.
            b'{' if b.get(i + 1) == Some(&b'{') => (TokenKind::Directive, skip_directive(src, i)?),
            b'{' => (TokenKind::LBrace, i + 1),
            b'}' => (TokenKind::RBrace, i + 1),
            b'[' => (TokenKind::LBracket, i + 1),
            b']' => (TokenKind::RBracket, i + 1),
            b':' => (TokenKind::Colon, i + 1),
            b',' => (TokenKind::Comma, i + 1),
            b'"' => (TokenKind::Str, skip_string(src, i)?),
            _ => {
                let mut j = i;
                while b
                    .get(j)
                    .is_some_and(|&c| !is_space(c) && !b"{}[]:,\"".contains(&c))
                {
                    j += 1;
                }
                (TokenKind::Bare, j)
            }
        };
        toks.push(Tok {
            kind,
            start: i,
            end,
        });
        i = end;
    }
    Ok(toks)
}

/// A matched `{...}` or `[...]`.
#[derive(Debug, Clone, Copy)]
struct Node {
    object: bool,
    /// Token index of the opening brace/bracket.
    open: usize,
    /// Token index of the matching close.
    close: usize,
    /// Enclosing node, `None` for the top-level value.
    parent: Option<usize>,
}

/// A `"key": value` member of an object.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// Token index of the key string.
    key: usize,
    /// First token of the value (`{`/`[` for containers).
    value: usize,
    /// Last token of the value (the matching close for containers). A value
    /// that starts with a directive is just that directive.
    value_end: usize,
    /// Node index when the value is a container.
    node: Option<usize>,
}

/// Parse state of one open container while building a [`Doc`].
struct Frame {
    node: usize,
    /// Key token after which a `:` was seen and whose value is still due.
    pending_key: Option<usize>,
    /// Member whose value this container is (its `value_end` is set on close).
    member: Option<usize>,
}

/// A scanned template: tokens plus brace structure and object members.
struct Doc<'a> {
    src: &'a str,
    toks: Vec<Tok>,
    nodes: Vec<Node>,
    members: Vec<Member>,
    /// For each node, the indices of its direct members (keeps look-ups
    /// linear overall, even for hostile inputs with huge objects).
    node_members: Vec<Vec<usize>>,
}

/// One replacement of `src[start..end]`.
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

impl<'a> Doc<'a> {
    /// Tokenize `src` and match its braces with an explicit stack.
    fn build(src: &'a str) -> Result<Self, TemplateError> {
        let toks = tokenize(src)?;
        let mut doc = Doc {
            src,
            toks,
            nodes: Vec::new(),
            members: Vec::new(),
            node_members: Vec::new(),
        };
        let mut stack: Vec<Frame> = Vec::new();
        for i in 0..doc.toks.len() {
            let tok = doc.toks[i];
            let line = || line_of(src, tok.start);
            match tok.kind {
                // Control directives (`{{ if }}`, `{{ end }}`, comments...) are
                // transparent to the structure; a value directive right after
                // `"key":` (`"metadata": {{ .meta_json_str }}`) is that value.
                TokenKind::Directive => {
                    let pending = stack.last().is_some_and(|f| f.pending_key.is_some());
                    if !pending || is_control(doc.text(i, i)) {
                        continue;
                    }
                }
                TokenKind::Comma => match stack.last_mut() {
                    Some(f) => {
                        f.pending_key = None;
                        continue;
                    }
                    None => return Err(bad(format!("unexpected ',' at line {}", line()))),
                },
                TokenKind::Colon => {
                    let prev = i.checked_sub(1).map(|p| doc.toks[p].kind);
                    match stack.last_mut() {
                        Some(f) if doc.nodes[f.node].object && prev == Some(TokenKind::Str) => {
                            f.pending_key = Some(i - 1);
                        }
                        Some(_) => {}
                        None => return Err(bad(format!("unexpected ':' at line {}", line()))),
                    }
                    continue;
                }
                TokenKind::RBrace | TokenKind::RBracket => {
                    let object = tok.kind == TokenKind::RBrace;
                    let Some(frame) = stack.pop() else {
                        return Err(bad(format!(
                            "unbalanced braces: unexpected closing bracket at line {}",
                            line()
                        )));
                    };
                    let node = &mut doc.nodes[frame.node];
                    if node.object != object {
                        return Err(bad(format!(
                            "unbalanced braces: closing bracket at line {} does not match the one opened at line {}",
                            line(),
                            line_of(src, doc.toks[node.open].start)
                        )));
                    }
                    node.close = i;
                    if let Some(m) = frame.member {
                        doc.members[m].value_end = i;
                    }
                    continue;
                }
                _ => {}
            }
            // `tok` starts a value: a scalar, or an opening brace/bracket.
            let opens = matches!(tok.kind, TokenKind::LBrace | TokenKind::LBracket);
            let mut member = None;
            let parent = match stack.last_mut() {
                Some(f) => {
                    if let Some(key) = f.pending_key.take() {
                        member = Some(doc.members.len());
                        doc.node_members[f.node].push(doc.members.len());
                        doc.members.push(Member {
                            key,
                            value: i,
                            value_end: i,
                            node: None,
                        });
                    }
                    Some(f.node)
                }
                None if opens && doc.nodes.is_empty() => None,
                None if opens => {
                    return Err(bad(format!(
                        "a second top-level value starts at line {}",
                        line()
                    )));
                }
                None => {
                    return Err(bad(format!(
                        "unexpected text outside the top-level object at line {}",
                        line()
                    )));
                }
            };
            if opens {
                if stack.len() >= MAX_DEPTH {
                    return Err(bad(format!(
                        "nesting deeper than {MAX_DEPTH} levels at line {}",
                        line()
                    )));
                }
                let node = doc.nodes.len();
                doc.nodes.push(Node {
                    object: tok.kind == TokenKind::LBrace,
                    open: i,
                    close: i,
                    parent,
                });
                doc.node_members.push(Vec::new());
                if let Some(m) = member {
                    doc.members[m].node = Some(node);
                }
                stack.push(Frame {
                    node,
                    pending_key: None,
                    member,
                });
            }
        }
        // Report the innermost unclosed bracket: usually nearest the mistake.
        if let Some(f) = stack.last() {
            let open = doc.toks[doc.nodes[f.node].open].start;
            return Err(bad(format!(
                "unbalanced braces: bracket opened at line {} is never closed",
                line_of(src, open)
            )));
        }
        match doc.nodes.first() {
            None => Err(bad("no top-level JSON object".to_string())),
            Some(n) if !n.object => Err(bad("the top level is not a JSON object".to_string())),
            Some(_) => Ok(doc),
        }
    }

    /// Text of a string token without its quotes (escapes left as written).
    fn str_content(&self, tok: usize) -> &'a str {
        let t = self.toks[tok];
        if t.kind != TokenKind::Str {
            return "";
        }
        self.src.get(t.start + 1..t.end - 1).unwrap_or("")
    }

    /// Source text of a token range, inclusive.
    fn text(&self, first: usize, last: usize) -> &'a str {
        self.src
            .get(self.toks[first].start..self.toks[last].end)
            .unwrap_or("")
    }

    /// Direct members of object `obj` whose key is exactly `key`.
    fn members_named(&self, obj: usize, key: &'a str) -> impl Iterator<Item = Member> + '_ {
        self.node_members[obj]
            .iter()
            .map(|&m| self.members[m])
            .filter(move |m| self.str_content(m.key) == key)
    }

    /// Container nodes that are values of member `key` of object `obj`.
    fn child_nodes(&self, obj: usize, key: &'a str, object: bool) -> Vec<usize> {
        self.members_named(obj, key)
            .filter_map(|m| m.node)
            .filter(|&n| self.nodes[n].object == object)
            .collect()
    }

    /// The unique `static_resources.clusters[]` element with a direct
    /// `"name": "xds-grpc"` member.
    fn xds_grpc_cluster(&self) -> Result<usize, TemplateError> {
        let statics = self.child_nodes(0, "static_resources", true);
        if statics.is_empty() {
            return Err(bad(
                "no \"static_resources\" object at the top level".to_string()
            ));
        }
        let mut is_clusters = vec![false; self.nodes.len()];
        for &s in &statics {
            for a in self.child_nodes(s, "clusters", false) {
                is_clusters[a] = true;
            }
        }
        if !is_clusters.contains(&true) {
            return Err(bad(
                "no \"clusters\" array in \"static_resources\"".to_string()
            ));
        }
        let found: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| {
                let node = self.nodes[n];
                node.object
                    && node.parent.is_some_and(|p| is_clusters[p])
                    && self.members_named(n, "name").any(|m| {
                        self.toks[m.value].kind == TokenKind::Str
                            && self.str_content(m.value) == "xds-grpc"
                    })
            })
            .collect();
        match found.as_slice() {
            [] => Err(TemplateError::NoXdsGrpc),
            [one] => Ok(*one),
            many => Err(TemplateError::MultipleXdsGrpc { count: many.len() }),
        }
    }

    /// Edits for one `upstream_connection_options` member of cluster `xds`.
    fn patch_options(
        &self,
        xds: usize,
        uco: Member,
        ka: Keepalive,
    ) -> Result<Vec<Edit>, TemplateError> {
        let src = self.src;
        let uco_key = self.toks[uco.key].start;
        let unsupported = || TemplateError::UnsupportedUpstreamOptions {
            line: line_of(src, uco_key),
        };
        let Some(obj) = uco.node.filter(|&n| self.nodes[n].object) else {
            return Err(unsupported());
        };
        let node = self.nodes[obj];
        let uco_indent = line_indent(src, uco_key);

        let keepalives: Vec<Member> = self.members_named(obj, "tcp_keepalive").collect();
        check_duplicates(keepalives.len(), "tcp_keepalive")?;
        let mut edits = Vec::new();
        for &tk in &keepalives {
            if self.keepalive_matches(tk, ka) {
                continue;
            }
            let key_pos = self.toks[tk.key].start;
            let value = self.text(tk.value, tk.value_end);
            let layout = match own_line_indent(src, key_pos) {
                Some(indent) if value.contains('\n') => Layout::Multi {
                    indent,
                    unit: unit(indent, uco_indent),
                    eol: eol_at(src, key_pos),
                },
                _ => Layout::Compact,
            };
            edits.push(Edit {
                start: self.toks[tk.value].start,
                end: self.toks[tk.value_end].end,
                text: keepalive_json(ka, &layout),
            });
        }
        if !keepalives.is_empty() {
            return Ok(edits);
        }

        // No tcp_keepalive member yet.
        let first_inner = node.open + 1;
        if first_inner == node.close {
            // Empty `{}`: replace it with a complete object.
            let layout = match own_line_indent(src, uco_key) {
                Some(indent) => Layout::Multi {
                    indent,
                    unit: unit(
                        indent,
                        line_indent(src, self.toks[self.nodes[xds].open].start),
                    ),
                    eol: eol_at(src, uco_key),
                },
                None => Layout::Compact,
            };
            return Ok(vec![Edit {
                start: self.toks[node.open].start,
                end: self.toks[node.close].end,
                text: options_json(ka, &layout),
            }]);
        }
        // Prepend `"tcp_keepalive": {...},` before the first member. Only safe
        // when that member is unconditional (not preceded by a directive),
        // otherwise our comma could end up trailing.
        if self.toks[first_inner].kind != TokenKind::Str {
            return Err(unsupported());
        }
        let open_end = self.toks[node.open].end;
        let inner_pos = self.toks[first_inner].start;
        let on_new_line = src.get(open_end..inner_pos).unwrap_or("").contains('\n');
        let text = match own_line_indent(src, inner_pos) {
            Some(indent) if on_new_line => {
                let eol = eol_at(src, open_end);
                let layout = Layout::Multi {
                    indent,
                    unit: unit(indent, uco_indent),
                    eol,
                };
                format!(
                    "{eol}{indent}\"tcp_keepalive\": {},",
                    keepalive_json(ka, &layout)
                )
            }
            _ => format!(
                " \"tcp_keepalive\": {},",
                keepalive_json(ka, &Layout::Compact)
            ),
        };
        Ok(vec![Edit {
            start: open_end,
            end: open_end,
            text,
        }])
    }

    /// Edit adding `upstream_connection_options` right after the
    /// `"name": "xds-grpc"` member of cluster `xds`.
    fn insert_options(&self, xds: usize, ka: Keepalive) -> Result<Edit, TemplateError> {
        let src = self.src;
        let name = self
            .members_named(xds, "name")
            .find(|m| self.str_content(m.value) == "xds-grpc")
            .ok_or(TemplateError::NoXdsGrpc)?;
        let key_pos = self.toks[name.key].start;
        let value_end = self.toks[name.value].end;
        let comma = self
            .toks
            .get(name.value + 1)
            .filter(|t| t.kind == TokenKind::Comma);
        let layout = match own_line_indent(src, key_pos) {
            Some(indent) => Layout::Multi {
                indent,
                unit: unit(
                    indent,
                    line_indent(src, self.toks[self.nodes[xds].open].start),
                ),
                eol: eol_at(src, key_pos),
            },
            None => Layout::Compact,
        };
        let member = format!(
            "\"upstream_connection_options\": {}",
            options_json(ka, &layout)
        );
        let sep = match layout {
            Layout::Multi { indent, eol, .. } => format!("{eol}{indent}"),
            Layout::Compact => " ".to_string(),
        };
        // `"name": "xds-grpc",` -> `"name": "xds-grpc",<sep>NEW,`
        // `"name": "xds-grpc"`  -> `"name": "xds-grpc",<sep>NEW`
        // Either way what followed `name` still follows the same punctuation.
        Ok(match comma {
            Some(c) => Edit {
                start: c.end,
                end: c.end,
                text: format!("{sep}{member},"),
            },
            None => Edit {
                start: value_end,
                end: value_end,
                text: format!(",{sep}{member}"),
            },
        })
    }

    /// Whether member `tk` (a `tcp_keepalive`) is already an object holding
    /// exactly the three requested values as plain numbers.
    fn keepalive_matches(&self, tk: Member, ka: Keepalive) -> bool {
        let Some(obj) = tk.node.filter(|&n| self.nodes[n].object) else {
            return false;
        };
        let node = self.nodes[obj];
        if self.toks[node.open..=node.close]
            .iter()
            .any(|t| t.kind == TokenKind::Directive)
        {
            return false;
        }
        let want = [
            ("keepalive_time", ka.time),
            ("keepalive_probes", ka.probes),
            ("keepalive_interval", ka.interval),
        ];
        self.node_members[obj].len() == want.len()
            && want.iter().all(|&(key, v)| {
                let mut it = self.members_named(obj, key);
                matches!(
                    (it.next(), it.next()),
                    (Some(m), None)
                        if m.value == m.value_end
                            && self.toks[m.value].kind == TokenKind::Bare
                            && is_number(self.text(m.value, m.value), v)
                )
            })
    }
}

/// Whether `text` is a plain JSON integer equal to `want` (`parse` alone
/// would also accept `+30`).
fn is_number(text: &str, want: u32) -> bool {
    text.bytes().all(|b| b.is_ascii_digit()) && text.parse::<u32>() == Ok(want)
}

/// Whether a directive is control flow or a comment (`{{ if }}`, `{{- end }}`,
/// `{{/* */}}`...) rather than one that prints a value.
fn is_control(directive: &str) -> bool {
    let inner = directive.strip_prefix("{{").unwrap_or(directive);
    let inner = inner.strip_prefix('-').unwrap_or(inner).trim_start();
    if inner.starts_with("/*") {
        return true;
    }
    let word_len = inner
        .bytes()
        .take_while(|b| b.is_ascii_alphabetic())
        .count();
    matches!(
        &inner[..word_len],
        "if" | "else" | "end" | "range" | "with" | "define" | "break" | "continue"
    )
}

/// How to format generated JSON.
enum Layout<'s> {
    /// One line: `{ "a": 1, "b": 2 }`.
    Compact,
    /// One member per line. `indent` is the indentation of the line holding
    /// the key (and of the closing brace), `unit` one nesting step.
    Multi {
        indent: &'s str,
        unit: &'s str,
        eol: &'s str,
    },
}

/// The `tcp_keepalive` object.
fn keepalive_json(ka: Keepalive, layout: &Layout) -> String {
    let fields = [
        ("keepalive_time", ka.time),
        ("keepalive_probes", ka.probes),
        ("keepalive_interval", ka.interval),
    ];
    let items: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect();
    match layout {
        Layout::Compact => format!("{{ {} }}", items.join(", ")),
        Layout::Multi { indent, unit, eol } => {
            let sep = format!(",{eol}{indent}{unit}");
            format!("{{{eol}{indent}{unit}{}{eol}{indent}}}", items.join(&sep))
        }
    }
}

/// The `upstream_connection_options` object holding only `tcp_keepalive`.
fn options_json(ka: Keepalive, layout: &Layout) -> String {
    match layout {
        Layout::Compact => format!(
            "{{ \"tcp_keepalive\": {} }}",
            keepalive_json(ka, &Layout::Compact)
        ),
        Layout::Multi { indent, unit, eol } => {
            let inner = format!("{indent}{unit}");
            let ka_json = keepalive_json(
                ka,
                &Layout::Multi {
                    indent: &inner,
                    unit,
                    eol,
                },
            );
            format!("{{{eol}{inner}\"tcp_keepalive\": {ka_json}{eol}{indent}}}")
        }
    }
}

/// Leading whitespace of the line holding `pos`.
fn line_indent(src: &str, pos: usize) -> &str {
    let head = src.get(..pos).unwrap_or("");
    let line = &head[head.rfind('\n').map_or(0, |i| i + 1)..];
    let n = line.len() - line.trim_start_matches([' ', '\t']).len();
    &line[..n]
}

/// Like [`line_indent`], but `None` unless `pos` is the first non-blank
/// character of its line (only then is a multi-line layout appropriate).
fn own_line_indent(src: &str, pos: usize) -> Option<&str> {
    let head = src.get(..pos)?;
    let before = &head[head.rfind('\n').map_or(0, |i| i + 1)..];
    before
        .bytes()
        .all(|b| b == b' ' || b == b'\t')
        .then_some(before)
}

/// One indentation step: how much deeper `inner` is than `outer`, or two
/// spaces when that cannot be told.
fn unit<'s>(inner: &'s str, outer: &str) -> &'s str {
    match inner.strip_prefix(outer) {
        Some(u) if !u.is_empty() => u,
        _ => "  ",
    }
}

/// The line ending used by the line holding `pos` (`\r\n` or `\n`).
fn eol_at(src: &str, pos: usize) -> &'static str {
    let rest = src.as_bytes().get(pos..).unwrap_or(&[]);
    match rest.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && rest[i - 1] == b'\r' => "\r\n",
        Some(_) => "\n",
        None if src.contains("\r\n") => "\r\n",
        None => "\n",
    }
}

/// Apply non-overlapping edits to `src`.
fn apply_edits(src: &str, edits: &mut [Edit]) -> Result<String, TemplateError> {
    edits.sort_by_key(|e| (e.start, e.end));
    let mut out = String::with_capacity(src.len() + 256);
    let mut at = 0;
    for e in edits.iter() {
        let keep = src
            .get(at..e.start)
            .ok_or_else(|| bad("overlapping edits".to_string()))?;
        out.push_str(keep);
        out.push_str(&e.text);
        at = e.end;
    }
    out.push_str(src.get(at..).unwrap_or(""));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V15: &str = include_str!("../tests/fixtures/bootstrap/istio-1.5.tmpl.json");
    const V15_EXPECTED: &str = include_str!("../tests/fixtures/bootstrap/istio-1.5.expected.json");
    const V17: &str = include_str!("../tests/fixtures/bootstrap/istio-1.7.tmpl.json");
    const V17_EXPECTED: &str = include_str!("../tests/fixtures/bootstrap/istio-1.7.expected.json");
    const V112: &str = include_str!("../tests/fixtures/bootstrap/istio-1.12.tmpl.json");
    const NO_UCO: &str = include_str!("../tests/fixtures/bootstrap/no-upstream-options.tmpl.json");
    const NO_UCO_EXPECTED: &str =
        include_str!("../tests/fixtures/bootstrap/no-upstream-options.expected.json");
    const POD: &str = include_str!("../tests/fixtures/bootstrap/not-a-template.json");
    const TWO_XDS: &str = include_str!("../tests/fixtures/bootstrap/two-xds.tmpl.json");

    fn patch(src: &str) -> Result<Patched, TemplateError> {
        patch_template(src, Keepalive::default())
    }

    fn reason(err: TemplateError) -> String {
        match err {
            TemplateError::NotABootstrapTemplate { reason } => reason,
            other => panic!("expected NotABootstrapTemplate, got {other:?}"),
        }
    }

    /// Patch `src`, compare with `expected`, check idempotence and that the
    /// patched xds-grpc cluster renders to valid JSON with the values.
    fn check(src: &str, expected: &str, ka: Keepalive) {
        let out = patch_template(src, ka).unwrap();
        assert_eq!(out.text, expected);
        assert_eq!(out.changed, src != expected);
        let again = patch_template(&out.text, ka).unwrap();
        assert_eq!(again.text, out.text, "second pass must not change the text");
        assert!(!again.changed);
        check_rendered(&out.text, ka);
    }

    // ---- test-only "renderer" -------------------------------------------

    /// Render as if every condition were true and every range ran once:
    /// drop lines holding only a control directive, drop `{{ else }}`
    /// branches, then replace every other directive with a placeholder (`0`
    /// outside strings, `x` inside). Only enough for the xds-grpc region.
    fn render(text: &str) -> String {
        let mut kept = String::new();
        // One entry per open if/range/with: whether its lines are skipped.
        let mut skipping: Vec<bool> = Vec::new();
        for line in text.split_inclusive('\n') {
            let t = line.trim();
            let whole = t.starts_with("{{") && skip_directive(t, 0).ok() == Some(t.len());
            if whole && is_control(t) {
                let word = t.trim_start_matches(['{', '-', ' ']);
                if word.starts_with("else") {
                    if let Some(top) = skipping.last_mut() {
                        *top = true;
                    }
                } else if word.starts_with("end") {
                    skipping.pop();
                } else if !word.starts_with("/*") {
                    skipping.push(false);
                }
                continue;
            }
            if !skipping.contains(&true) {
                kept.push_str(line);
            }
        }
        let b = kept.as_bytes();
        let mut out = Vec::new();
        let (mut i, mut in_str) = (0, false);
        while i < b.len() {
            match b[i] {
                b'{' if b.get(i + 1) == Some(&b'{') => {
                    out.push(if in_str { b'x' } else { b'0' });
                    i = skip_directive(&kept, i).unwrap();
                    continue;
                }
                b'\\' if in_str => {
                    out.extend_from_slice(&b[i..i + 2]);
                    i += 2;
                    continue;
                }
                b'"' => in_str = !in_str,
                _ => {}
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }

    /// Minimal JSON syntax check (recursive; test inputs are small).
    fn json_ok(s: &str) -> Result<(), String> {
        fn ws(b: &[u8], i: &mut usize) {
            while b.get(*i).is_some_and(|&c| is_space(c)) {
                *i += 1;
            }
        }
        fn eat(b: &[u8], i: &mut usize, c: u8) -> Result<(), String> {
            ws(b, i);
            if b.get(*i) == Some(&c) {
                *i += 1;
                Ok(())
            } else {
                Err(format!("expected '{}' at byte {}", c as char, *i))
            }
        }
        fn value(b: &[u8], i: &mut usize) -> Result<(), String> {
            ws(b, i);
            match b.get(*i) {
                Some(&open @ (b'{' | b'[')) => {
                    let close = if open == b'{' { b'}' } else { b']' };
                    *i += 1;
                    ws(b, i);
                    if b.get(*i) == Some(&close) {
                        *i += 1;
                        return Ok(());
                    }
                    loop {
                        if open == b'{' {
                            ws(b, i);
                            if b.get(*i) != Some(&b'"') {
                                return Err(format!("expected key at byte {}", *i));
                            }
                            value(b, i)?;
                            eat(b, i, b':')?;
                        }
                        value(b, i)?;
                        ws(b, i);
                        match b.get(*i) {
                            Some(b',') => *i += 1,
                            Some(&c) if c == close => {
                                *i += 1;
                                return Ok(());
                            }
                            _ => return Err(format!("expected ',' or close at byte {}", *i)),
                        }
                    }
                }
                Some(b'"') => {
                    *i += 1;
                    loop {
                        match b.get(*i) {
                            Some(b'"') => break,
                            Some(b'\\') => *i += 2,
                            Some(_) => *i += 1,
                            None => return Err("unterminated string".into()),
                        }
                    }
                    *i += 1;
                    Ok(())
                }
                _ => {
                    let start = *i;
                    while b
                        .get(*i)
                        .is_some_and(|c| c.is_ascii_alphanumeric() || b"+-.".contains(c))
                    {
                        *i += 1;
                    }
                    let word = std::str::from_utf8(&b[start..*i]).unwrap();
                    match word {
                        "true" | "false" | "null" => Ok(()),
                        w if w.parse::<f64>().is_ok() => Ok(()),
                        w => Err(format!("bad literal {w:?} at byte {start}")),
                    }
                }
            }
        }
        let b = s.as_bytes();
        let mut i = 0;
        value(b, &mut i)?;
        ws(b, &mut i);
        if i == b.len() {
            Ok(())
        } else {
            Err(format!("trailing text at byte {i}"))
        }
    }

    /// The number after `"key":` in `s`, whatever the spacing.
    fn number_after(s: &str, key: &str) -> Option<u32> {
        let pat = format!("\"{key}\"");
        let rest = s[s.find(&pat)? + pat.len()..].trim_start();
        let rest = rest.strip_prefix(':')?.trim_start();
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// The xds-grpc cluster text of a (patched) template.
    fn xds_region(text: &str) -> &str {
        let doc = Doc::build(text).unwrap();
        let node = doc.nodes[doc.xds_grpc_cluster().unwrap()];
        doc.text(node.open, node.close)
    }

    fn check_rendered(text: &str, ka: Keepalive) {
        let rendered = render(xds_region(text));
        if let Err(e) = json_ok(&rendered) {
            panic!("rendered xds-grpc cluster is not JSON: {e}\n{rendered}");
        }
        let tcp = &rendered[rendered.find("\"tcp_keepalive\"").expect("tcp_keepalive")..];
        assert_eq!(number_after(tcp, "keepalive_time"), Some(ka.time));
        assert_eq!(number_after(tcp, "keepalive_probes"), Some(ka.probes));
        assert_eq!(number_after(tcp, "keepalive_interval"), Some(ka.interval));
    }

    #[test]
    fn renderer_sanity() {
        // The test helpers themselves must reject broken output.
        assert!(json_ok(&render("{ \"a\": {{ .x }}, \"b\": \"{{ .y }}\" }")).is_ok());
        assert!(json_ok("{ \"a\": 1, }").is_err());
        assert!(json_ok("{ \"a\": 1 \"b\": 2 }").is_err());
        assert!(json_ok("{ \"a\": { }").is_err());
        assert_eq!(
            render("[\n  {{- if .a }}\n  1\n  {{- end }}\n]"),
            "[\n  1\n]"
        );
        let chain = "{\n{{ if .a }}\n\"f\": 1\n{{ else if .b }}\n\"f\": 2\n{{ else }}\n\"f\": 3\n{{ end }}\n}";
        assert_eq!(render(chain), "{\n\"f\": 1\n}");
    }

    // ---- fixtures ---------------------------------------------------------

    #[test]
    fn istio_1_5_v2_template() {
        check(V15, V15_EXPECTED, Keepalive::default());
    }

    #[test]
    fn istio_1_7_v3_template() {
        check(V17, V17_EXPECTED, Keepalive::default());
    }

    #[test]
    fn cluster_without_upstream_connection_options() {
        check(NO_UCO, NO_UCO_EXPECTED, Keepalive::default());
    }

    #[test]
    fn expected_outputs_are_fixed_points() {
        for expected in [V15_EXPECTED, V17_EXPECTED, NO_UCO_EXPECTED] {
            check(expected, expected, Keepalive::default());
        }
    }

    #[test]
    fn istio_1_12_pipe_address_is_refused() {
        let err = patch(V112).unwrap_err();
        assert_eq!(err, TemplateError::PipeAddress);
        let msg = err.to_string();
        assert!(msg.contains("Istio >= 1.8"), "{msg}");
        assert!(msg.contains("agent over a Unix socket"), "{msg}");
        assert!(msg.contains("TCP keepalive does not apply"), "{msg}");
        // What to do instead, per version.
        assert!(msg.contains("Istio 1.8-1.17 needs nothing"), "{msg}");
        assert!(msg.contains("GRPC_KEEPALIVE_INTERVAL"), "{msg}");
        assert!(msg.contains("automatically"), "{msg}");
    }

    #[test]
    fn pipe_in_another_cluster_is_fine() {
        // sds-grpc uses a pipe in 1.5 and 1.7; only xds-grpc matters.
        assert!(V17.contains("\"pipe\""));
        assert!(patch(V17).is_ok());
    }

    #[test]
    fn pod_json_is_refused() {
        let r = reason(patch(POD).unwrap_err());
        assert!(r.contains("static_resources"), "{r}");
        let msg = patch(POD).unwrap_err().to_string();
        assert!(
            msg.starts_with("not an envoy bootstrap template: "),
            "{msg}"
        );
    }

    #[test]
    fn two_xds_clusters_are_refused() {
        let err = patch(TWO_XDS).unwrap_err();
        assert_eq!(err, TemplateError::MultipleXdsGrpc { count: 2 });
        assert!(err.to_string().contains("found 2 clusters"));
    }

    #[test]
    fn xds_grpc_must_be_a_direct_cluster_name() {
        // "xds-grpc" as cluster_name, as a nested name, and outside
        // static_resources.clusters does not count.
        let src = r#"{
  "dynamic_resources": { "ads_config": { "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds-grpc" } }] } },
  "other": [{ "name": "xds-grpc" }],
  "static_resources": {
    "clusters": [
      {
        "name": "sds-grpc",
        "load_assignment": { "cluster_name": "xds-grpc", "endpoints": [] },
        "transport_socket": { "name": "xds-grpc" }
      }
    ]
  }
}"#;
        let err = patch(src).unwrap_err();
        assert_eq!(err, TemplateError::NoXdsGrpc);
        assert!(err.to_string().contains("no cluster named \"xds-grpc\""));
    }

    #[test]
    fn missing_clusters_is_refused() {
        let r = reason(patch(r#"{ "static_resources": { "listeners": [] } }"#).unwrap_err());
        assert!(r.contains("\"clusters\""), "{r}");
        let r = reason(patch(r#"{ "static_resources": { "clusters": {} } }"#).unwrap_err());
        assert!(r.contains("\"clusters\""), "{r}");
        let r = reason(patch("[1, 2]").unwrap_err());
        assert!(r.contains("not a JSON object"), "{r}");
        let r = reason(patch("{{ .only_a_directive }}\n").unwrap_err());
        assert!(r.contains("no top-level JSON object"), "{r}");
    }

    // ---- formatting and variants ------------------------------------------

    #[test]
    fn crlf_is_preserved() {
        for (src, expected) in [(V15, V15_EXPECTED), (NO_UCO, NO_UCO_EXPECTED)] {
            let src = src.replace('\n', "\r\n");
            let expected = expected.replace('\n', "\r\n");
            check(&src, &expected, Keepalive::default());
        }
    }

    #[test]
    fn custom_values() {
        let ka = Keepalive {
            time: 7200,
            probes: 9,
            interval: 75,
        };
        let out = patch_template(V17, ka).unwrap();
        assert!(out.changed);
        assert!(out.text.contains(
            "\"keepalive_time\": 7200,\n            \"keepalive_probes\": 9,\n            \"keepalive_interval\": 75\n"
        ));
        check(V17, &out.text, ka);
        // Switching back to the defaults yields the default expectation.
        assert_eq!(patch(&out.text).unwrap().text, V17_EXPECTED);
        let out = patch_template(NO_UCO, ka).unwrap();
        check(NO_UCO, &out.text, ka);
    }

    /// A minimal template around one xds-grpc cluster body.
    fn wrap(cluster: &str) -> String {
        format!("{{\n  \"static_resources\": {{\n    \"clusters\": [\n{cluster}\n    ]\n  }}\n}}\n")
    }

    #[test]
    fn already_set_in_any_formatting_is_unchanged() {
        let src = wrap(
            r#"      { "name": "xds-grpc", "upstream_connection_options": {"tcp_keepalive":{"keepalive_interval":5,"keepalive_time":30,"keepalive_probes":3}} }"#,
        );
        let out = patch(&src).unwrap();
        assert!(!out.changed);
        assert_eq!(out.text, src);
        // Same values as `+30` or via a directive are not "already set".
        for value in [
            r#"{"keepalive_interval":5,"keepalive_time":+30,"keepalive_probes":3}"#,
            r#"{"keepalive_interval":5,"keepalive_time":30,"keepalive_probes":3,"x":1}"#,
            r#"{"keepalive_interval":5,"keepalive_time":{{ .t }},"keepalive_probes":3}"#,
        ] {
            let src = wrap(&format!(
                "      {{ \"name\": \"xds-grpc\", \"upstream_connection_options\": {{\"tcp_keepalive\":{value}}} }}"
            ));
            assert!(patch(&src).unwrap().changed, "{value}");
        }
    }

    #[test]
    fn one_line_cluster_gets_compact_output() {
        let src = wrap(
            r#"      { "name": "xds-grpc", "upstream_connection_options": { "tcp_keepalive": { "keepalive_time": 300 } } }"#,
        );
        let want = wrap(
            r#"      { "name": "xds-grpc", "upstream_connection_options": { "tcp_keepalive": { "keepalive_time": 30, "keepalive_probes": 3, "keepalive_interval": 5 } } }"#,
        );
        check(&src, &want, Keepalive::default());
    }

    #[test]
    fn keepalive_given_by_a_directive_is_replaced() {
        let src = wrap(
            "      {\n        \"name\": \"xds-grpc\",\n        \"upstream_connection_options\": {\n          \"tcp_keepalive\": {{ .keepalive }}\n        }\n      }",
        );
        let want = wrap(
            "      {\n        \"name\": \"xds-grpc\",\n        \"upstream_connection_options\": {\n          \"tcp_keepalive\": { \"keepalive_time\": 30, \"keepalive_probes\": 3, \"keepalive_interval\": 5 }\n        }\n      }",
        );
        check(&src, &want, Keepalive::default());
    }

    #[test]
    fn upstream_options_without_tcp_keepalive() {
        // Other members: tcp_keepalive goes first, with a comma.
        let src = wrap(
            "      {\n        \"name\": \"xds-grpc\",\n        \"upstream_connection_options\": {\n          \"set_local_interface_name_on_upstream_connections\": true\n        }\n      }",
        );
        let want = wrap(
            "      {\n        \"name\": \"xds-grpc\",\n        \"upstream_connection_options\": {\n          \"tcp_keepalive\": {\n            \"keepalive_time\": 30,\n            \"keepalive_probes\": 3,\n            \"keepalive_interval\": 5\n          },\n          \"set_local_interface_name_on_upstream_connections\": true\n        }\n      }",
        );
        check(&src, &want, Keepalive::default());
        // Empty object: replaced whole.
        let src = wrap(
            "      {\n        \"name\": \"xds-grpc\",\n        \"upstream_connection_options\": {},\n        \"type\": \"STATIC\"\n      }",
        );
        let want = wrap(
            "      {\n        \"name\": \"xds-grpc\",\n        \"upstream_connection_options\": {\n          \"tcp_keepalive\": {\n            \"keepalive_time\": 30,\n            \"keepalive_probes\": 3,\n            \"keepalive_interval\": 5\n          }\n        },\n        \"type\": \"STATIC\"\n      }",
        );
        check(&src, &want, Keepalive::default());
    }

    #[test]
    fn upstream_options_that_are_not_an_object_are_refused() {
        let src = wrap(
            "      {\n        \"name\": \"xds-grpc\",\n        \"upstream_connection_options\": {{ .uco }}\n      }",
        );
        let err = patch(&src).unwrap_err();
        assert_eq!(err, TemplateError::UnsupportedUpstreamOptions { line: 6 });
        assert!(err.to_string().contains("(line 6)"));
        // Only conditional members: a leading comma-terminated member could
        // leave a trailing comma when rendered, so refuse.
        let src = wrap(
            "      {\n        \"name\": \"xds-grpc\",\n        \"upstream_connection_options\": {\n          {{- if .x }}\n          \"a\": 1\n          {{- end }}\n        }\n      }",
        );
        assert!(matches!(
            patch(&src),
            Err(TemplateError::UnsupportedUpstreamOptions { line: 6 })
        ));
    }

    #[test]
    fn name_as_last_member_and_tabs() {
        let src = wrap("\t{\n\t\t\"type\": \"STATIC\",\n\t\t\"name\": \"xds-grpc\"\n\t}");
        let want = wrap(
            "\t{\n\t\t\"type\": \"STATIC\",\n\t\t\"name\": \"xds-grpc\",\n\t\t\"upstream_connection_options\": {\n\t\t\t\"tcp_keepalive\": {\n\t\t\t\t\"keepalive_time\": 30,\n\t\t\t\t\"keepalive_probes\": 3,\n\t\t\t\t\"keepalive_interval\": 5\n\t\t\t}\n\t\t}\n\t}",
        );
        check(&src, &want, Keepalive::default());
        let src = wrap(r#"      { "name": "xds-grpc" }"#);
        let want = wrap(
            r#"      { "name": "xds-grpc", "upstream_connection_options": { "tcp_keepalive": { "keepalive_time": 30, "keepalive_probes": 3, "keepalive_interval": 5 } } }"#,
        );
        check(&src, &want, Keepalive::default());
    }

    #[test]
    fn directives_with_quotes_and_braces_are_opaque() {
        let src = wrap(concat!(
            "      {{/* a comment with }} and \" and { */}}\n",
            "      {{- if eq .foo \"}}\" `}}` '}' }}\n",
            "      {\n",
            "        \"name\": \"xds-grpc\",\n",
            "        \"sni\": \"{{ printf \"%s}}\" .host }}\",\n",
            "        \"upstream_connection_options\": { \"tcp_keepalive\": { \"keepalive_time\": 300 } }\n",
            "      }\n",
            "      {{- end }}",
        ));
        let out = patch(&src).unwrap();
        assert!(out.changed);
        assert!(out.text.contains("\"keepalive_probes\": 3"));
        assert_eq!(
            out.text.replace(
                "\"keepalive_time\": 30, \"keepalive_probes\": 3, \"keepalive_interval\": 5",
                "\"keepalive_time\": 300"
            ),
            src
        );
    }

    #[test]
    fn malformed_input_reports_lines() {
        let r = reason(patch("{\n  \"a\": \"oops,\n  \"b\": 1\n}").unwrap_err());
        assert!(r.contains("unterminated string starting at line 2"), "{r}");
        let r = reason(patch("{\n  \"a\": {{ .x \n}").unwrap_err());
        assert!(
            r.contains("unterminated {{ directive starting at line 2"),
            "{r}"
        );
        let r = reason(patch("{\n  \"a\": [\n  }\n}").unwrap_err());
        assert!(r.contains("line 3") && r.contains("line 2"), "{r}");
        let r = reason(patch("{\n  \"a\": {\n").unwrap_err());
        assert!(
            r.contains("unbalanced braces") && r.contains("line 2"),
            "{r}"
        );
        let r = reason(patch("{}\n}").unwrap_err());
        assert!(
            r.contains("unbalanced braces") && r.contains("line 2"),
            "{r}"
        );
        let r = reason(patch("{} {}").unwrap_err());
        assert!(r.contains("second top-level value"), "{r}");
    }

    // ---- robustness -------------------------------------------------------

    #[test]
    fn every_prefix_of_a_fixture() {
        for (i, _) in V15.char_indices() {
            let _ = patch(&V15[..i]);
        }
        assert!(patch(V15).is_ok());
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        for unit in ["{", "{ ", "[", "{\"a\":", "[{{ x }}"] {
            let big = unit.repeat(100_000);
            assert!(patch(&big).is_err(), "{unit}");
        }
        let r = reason(patch(&"[ ".repeat(100_000)).unwrap_err());
        assert!(r.contains("nesting deeper than"), "{r}");
    }

    #[test]
    fn huge_flat_inputs_stay_linear() {
        // 100k clusters and 100k members: quadratic look-ups would hang here.
        let mut src = String::from("{\"static_resources\":{\"clusters\":[");
        src.push_str(&"{\"a\":1,\"b\":2},".repeat(100_000));
        src.push_str("{\"name\":\"xds-grpc\"");
        src.push_str(&",\"upstream_connection_options\":{}".repeat(100_000));
        src.push_str("}]}}");
        let r = reason(patch(&src).unwrap_err());
        assert!(
            r.contains("100000 \"upstream_connection_options\" members"),
            "{r}"
        );
        let fine = src.replace(",\"upstream_connection_options\":{}", "");
        assert!(patch(&fine).unwrap().changed);
    }

    /// xorshift64: small deterministic PRNG, no dependencies.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_bytes_do_not_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..300 {
            let len = rng.below(2000);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = patch(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn random_token_soup_does_not_panic() {
        const PIECES: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            "\"",
            "\\",
            "{{",
            "}}",
            "{{ if .x }}",
            "{{- end }}",
            "{{/*",
            "*/}}",
            "`",
            "'",
            "\n",
            "\r\n",
            " ",
            "\"name\"",
            "\"xds-grpc\"",
            "\"static_resources\"",
            "\"clusters\"",
            "\"upstream_connection_options\"",
            "\"tcp_keepalive\"",
            "\"keepalive_time\"",
            "\"pipe\"",
            "300",
            "é",
            "€",
            "🦀",
        ];
        let mut rng = Rng(42);
        for _ in 0..2000 {
            let n = rng.below(60);
            let s: String = (0..n).map(|_| PIECES[rng.below(PIECES.len())]).collect();
            let _ = patch(&s);
        }
    }

    #[test]
    fn mutated_fixtures_never_panic_and_stay_idempotent() {
        const INSERTS: &[&str] = &[
            "{",
            "}",
            "\"",
            ",",
            "{{ end }}",
            "{{",
            "é",
            "\n",
            "\"name\": \"xds-grpc\",",
        ];
        let mut rng = Rng(7);
        let mut patched = 0;
        for round in 0..600 {
            let base = [V15, V17, NO_UCO][round % 3];
            let mut s = base.to_string();
            for _ in 0..1 + rng.below(3) {
                let mut at = rng.below(s.len() + 1);
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                if rng.below(2) == 0 {
                    let mut end = (at + rng.below(40)).min(s.len());
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    s.replace_range(at..end, "");
                } else {
                    s.insert_str(at, INSERTS[rng.below(INSERTS.len())]);
                }
            }
            if let Ok(out) = patch(&s) {
                patched += 1;
                let again = patch(&out.text).expect("patched output must patch again");
                assert_eq!(again.text, out.text, "not idempotent for input:\n{s}");
                assert!(!again.changed);
            }
        }
        // Most single edits land in strings or whitespace-insensitive spots,
        // so a good share must still patch: the property is really exercised.
        eprintln!("mutated inputs patched: {patched}/600");
        assert!(patched > 100, "only {patched} mutated inputs patched");
    }
}
