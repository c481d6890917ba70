//! Leaf values of the config file: durations (`250ms`, `1m30s`), sizes (`64KiB`, `1MB`,
//! bytes) and `${NAME}` environment interpolation, plus the serde leaf types that apply
//! them while a value is deserialized (so a bad value is reported at its own line).
//! Knows nothing about YAML or about which key a value belongs to.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};

// === durations ===

/// Duration units, largest first; a compound duration must use them in this order.
const DURATION_UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// Parses `250ms`, `20s`, `5m`, `1h`, `1m30s`, `0s`. Millisecond precision.
///
/// Error messages never repeat the input, so they are safe for env-substituted text.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration; write e.g. `10s`, `250ms`, `5m` or `1h`".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "a duration needs a unit; write e.g. `{s}s` or `{s}ms` (units: ms, s, m, h)"
        ));
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total_ms: u64 = 0;
    // Index into DURATION_UNITS of the last unit used; later parts must use a smaller unit.
    let mut last_unit: Option<usize> = None;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(
                "not a duration; write a whole number followed by a unit, e.g. `10s`, `250ms`, `1m30s`"
                    .into(),
            );
        }
        let number: u64 = s[start..i]
            .parse()
            .map_err(|_| "duration is too large".to_string())?;
        // A decimal part (`1.5s`, as Go and Caddy accept): its digits and their count.
        let mut fraction = (0u64, 0u32);
        if bytes.get(i) == Some(&b'.') {
            i += 1;
            let digits = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if i == digits || i - digits > 9 {
                return Err(
                    "a decimal duration needs 1 to 9 digits after the point, e.g. `1.5s`".into(),
                );
            }
            let value = s[digits..i]
                .parse()
                .map_err(|_| "not a duration".to_string())?;
            fraction = (value, (i - digits) as u32);
        }
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &s[unit_start..i];
        if unit.is_empty() {
            return Err(
                "every number in a duration needs a unit (ms, s, m, h), e.g. `1m30s`".into(),
            );
        }
        let Some(index) = DURATION_UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(format!(
                "unknown duration unit `{}`; use ms, s, m or h",
                unit.escape_debug()
            ));
        };
        if last_unit.is_some_and(|last| index <= last) {
            return Err(
                "units of a compound duration must go from largest to smallest, each once, e.g. `1h30m`"
                    .into(),
            );
        }
        last_unit = Some(index);
        let unit_ms = DURATION_UNITS[index].1;
        let scale = 10u64.pow(fraction.1);
        let fraction_ms = fraction
            .0
            .checked_mul(unit_ms)
            .ok_or_else(|| "duration is too large".to_string())?;
        if fraction_ms % scale != 0 {
            return Err(format!(
                "durations are counted in whole milliseconds; `{s}` is finer than that"
            ));
        }
        total_ms = number
            .checked_mul(unit_ms)
            .and_then(|ms| ms.checked_add(fraction_ms / scale))
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| "duration is too large".to_string())?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration the way the config file writes it (`1m30s`, `250ms`, `0s`).
pub fn fmt_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (name, unit_ms) in DURATION_UNITS {
        let unit_ms = u128::from(unit_ms);
        if ms >= unit_ms {
            out.push_str(&format!("{}{name}", ms / unit_ms));
            ms %= unit_ms;
        }
    }
    out
}

// === sizes ===

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Size suffixes: binary (`KiB` = 1024) and decimal (`KB` = 1000), as in SPEC §2.
const SIZE_UNITS: [(&str, u64); 9] = [
    ("B", 1),
    ("KiB", KIB),
    ("MiB", MIB),
    ("GiB", GIB),
    ("TiB", TIB),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

/// Parses a size in bytes: `4096`, `512B`, `64KiB`, `1MiB`, `1GiB`, `16KB`, `1MB`, `1GB`.
///
/// Error messages never repeat the input, so they are safe for env-substituted text.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits_end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if digits_end == 0 {
        return Err(
            "not a size; write bytes as an integer or a number with a unit, e.g. `64KiB`, `1MiB`"
                .into(),
        );
    }
    let number: u64 = s[..digits_end]
        .parse()
        .map_err(|_| "size is too large".to_string())?;
    let rest = &s[digits_end..];
    if rest.starts_with('.') {
        return Err("fractions are not supported; use a smaller unit, e.g. `1536KiB`".into());
    }
    let unit = rest.trim_start();
    if unit.is_empty() {
        return Ok(number);
    }
    let Some((_, factor)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(format!(
            "unknown size unit `{}`; use B, KiB, MiB, GiB (1024-based) or KB, MB, GB (1000-based)",
            unit.escape_debug()
        ));
    };
    number
        .checked_mul(*factor)
        .ok_or_else(|| "size is too large (over 2^64 bytes)".to_string())
}

/// Formats a size in the largest binary unit that divides it (`16KiB`, `1MiB`, `1000B`).
pub fn fmt_size(bytes: u64) -> String {
    for (name, factor) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes != 0 && bytes.is_multiple_of(factor) {
            return format!("{}{name}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

// === ${NAME} interpolation ===

/// One piece of a string value: literal text or a `${NAME}` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Literal(&'a str),
    Var(&'a str),
}

/// Splits `text` into literals and `${NAME}` references. `$${` is a literal `${`; a `$`
/// not followed by `{` is literal. NAME is `[A-Za-z_][A-Za-z0-9_]*`.
pub fn split_template(text: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut literal_start = 0;
    let mut i = 0;
    while let Some(offset) = text[i..].find('$') {
        let dollar = i + offset;
        let after = &text[dollar + 1..];
        if after.starts_with("${") {
            // `$${` → literal `${`: keep the text up to and including the first `$`.
            pieces.push(Piece::Literal(&text[literal_start..=dollar]));
            literal_start = dollar + 2;
            i = dollar + 3;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(close) = body.find('}') else {
                return Err("unclosed `${`; write `${NAME}`, or `$${` for a literal `${`".into());
            };
            let name = &body[..close];
            if !is_var_name(name) {
                return Err(format!(
                    "invalid variable name `{}` in `${{...}}`; names match [A-Za-z_][A-Za-z0-9_]* (write `$${{` for a literal `${{`)",
                    name.escape_debug()
                ));
            }
            if literal_start < dollar {
                pieces.push(Piece::Literal(&text[literal_start..dollar]));
            }
            pieces.push(Piece::Var(name));
            i = dollar + 2 + close + 1;
            literal_start = i;
        } else {
            i = dollar + 1;
        }
    }
    if literal_start < text.len() {
        pieces.push(Piece::Literal(&text[literal_start..]));
    }
    Ok(pieces)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Replaces every `${NAME}` in `text` with `env(NAME)`. Returns the new text and whether
/// any variable was substituted (such text may be secret and must not be echoed).
pub fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(text.len());
    let mut substituted = false;
    for piece in split_template(text)? {
        match piece {
            Piece::Literal(s) => out.push_str(s),
            Piece::Var(name) => {
                let Some(value) = env(name) else {
                    return Err(format!(
                        "environment variable `{name}` is not set; export it or remove `${{{name}}}`"
                    ));
                };
                out.push_str(&value);
                substituted = true;
            }
        }
    }
    Ok((out, substituted))
}

// === environment snapshot for deserialization ===

thread_local! {
    /// The variables a load may substitute, set by [`EnvScope`] for the duration of one
    /// deserialization. serde gives `Deserialize` impls no context argument, so this is how
    /// [`Text`] reaches the caller's environment without touching process state.
    static ENV: RefCell<Option<HashMap<String, String>>> = const { RefCell::new(None) };
}

/// Makes `vars` the environment seen by [`Text`] on this thread until dropped.
pub struct EnvScope {
    previous: Option<HashMap<String, String>>,
}

impl EnvScope {
    pub fn enter(vars: HashMap<String, String>) -> EnvScope {
        let previous = ENV.with(|env| env.replace(Some(vars)));
        EnvScope { previous }
    }
}

impl Drop for EnvScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        ENV.with(|env| *env.borrow_mut() = previous);
    }
}

fn scoped_env(name: &str) -> Option<String> {
    ENV.with(|env| {
        env.borrow()
            .as_ref()
            .and_then(|vars| vars.get(name).cloned())
    })
}

// === serde leaf types ===

/// A string value after `${NAME}` interpolation.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Text {
    pub value: String,
    /// The text as written, kept only when a variable was substituted: messages quote
    /// this instead of `value`, which may be a secret.
    pub template: Option<String>,
}

impl Text {
    pub fn literal(value: &str) -> Text {
        Text {
            value: value.to_string(),
            template: None,
        }
    }

    /// How to quote this value in an error message without leaking env-substituted text.
    pub fn shown(&self) -> String {
        match &self.template {
            Some(template) => format!("`{template}` (from the environment)"),
            None => format!("`{}`", self.value.escape_debug()),
        }
    }

    pub(super) fn from_raw<E: de::Error>(raw: &str) -> Result<Text, E> {
        let (value, substituted) = interpolate(raw, &scoped_env).map_err(E::custom)?;
        Ok(Text {
            value,
            template: substituted.then(|| raw.to_string()),
        })
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.template {
            Some(template) => write!(f, "Text({template:?} => <redacted>)"),
            None => write!(f, "Text({:?})", self.value),
        }
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
        struct TextVisitor;
        impl Visitor<'_> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Text::from_raw(v)
            }
        }
        // Errors raised inside the visitor get the scalar's line and column from the
        // YAML deserializer, so this is called through it rather than returning early.
        deserializer.deserialize_str(TextVisitor)
    }
}

/// Parses a leaf that may be an integer or an (interpolated) string with `parse`.
fn deserialize_unit_value<'de, D, T>(
    deserializer: D,
    what: &'static str,
    fraction_hint: &'static str,
    from_int: fn(u64) -> Result<T, String>,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct UnitVisitor<T> {
        what: &'static str,
        fraction_hint: &'static str,
        from_int: fn(u64) -> Result<T, String>,
        parse: fn(&str) -> Result<T, String>,
    }
    impl<T> Visitor<'_> for UnitVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.what)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            (self.from_int)(v).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
            }
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
            Err(E::custom(self.fraction_hint))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            let text = Text::from_raw::<E>(v)?;
            (self.parse)(&text.value).map_err(|reason| {
                E::custom(format!(
                    "{} is not a valid {}: {reason}",
                    text.shown(),
                    self.what
                ))
            })
        }
    }
    deserializer.deserialize_any(UnitVisitor {
        what,
        fraction_hint,
        from_int,
        parse,
    })
}

/// A duration leaf (`20s`). A bare number is refused: it says to add a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<DurationValue, D::Error> {
        deserialize_unit_value(
            deserializer,
            "duration",
            "a duration is a whole number with a unit; write e.g. `1500ms` instead of `1.5`",
            |n| parse_duration(&n.to_string()),
            parse_duration,
        )
        .map(DurationValue)
    }
}

/// A number or boolean leaf that may also be written as a string, so that `${NAME}` can
/// supply it (`max_connections: "${MAX_CONNS}"`; SPEC §2 substitutes in every string).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scalar<T>(pub T);

/// The types a [`Scalar`] can hold, and how each is read from YAML's native scalars.
pub trait ScalarKind: Sized + std::str::FromStr {
    /// What a value of this kind is, for error messages.
    const WHAT: &'static str;
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_i64(v: i64) -> Option<Self> {
        u64::try_from(v).ok().and_then(Self::from_u64)
    }
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
}

impl ScalarKind for u32 {
    const WHAT: &'static str = "a whole number (0 to 4294967295)";
    fn from_u64(v: u64) -> Option<u32> {
        u32::try_from(v).ok()
    }
}

impl ScalarKind for u64 {
    const WHAT: &'static str = "a whole number";
    fn from_u64(v: u64) -> Option<u64> {
        Some(v)
    }
}

impl ScalarKind for f64 {
    const WHAT: &'static str = "a number";
    fn from_u64(v: u64) -> Option<f64> {
        Some(v as f64)
    }
    fn from_i64(v: i64) -> Option<f64> {
        Some(v as f64)
    }
    fn from_f64(v: f64) -> Option<f64> {
        Some(v)
    }
}

impl ScalarKind for bool {
    const WHAT: &'static str = "`true` or `false`";
    fn from_bool(v: bool) -> Option<bool> {
        Some(v)
    }
}

impl<'de, T: ScalarKind> Deserialize<'de> for Scalar<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Scalar<T>, D::Error> {
        struct ScalarVisitor<T>(std::marker::PhantomData<T>);
        impl<T: ScalarKind> ScalarVisitor<T> {
            fn or_invalid<E: de::Error>(&self, v: Option<T>, got: Unexpected<'_>) -> Result<T, E> {
                v.ok_or_else(|| E::invalid_value(got, self))
            }
        }
        impl<T: ScalarKind> Visitor<'_> for ScalarVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::WHAT)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
                self.or_invalid(T::from_u64(v), Unexpected::Unsigned(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
                self.or_invalid(T::from_i64(v), Unexpected::Signed(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
                self.or_invalid(T::from_f64(v), Unexpected::Float(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
                self.or_invalid(T::from_bool(v), Unexpected::Bool(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
                let text = Text::from_raw::<E>(v)?;
                text.value
                    .trim()
                    .parse()
                    .map_err(|_| E::custom(format!("{} is not {}", text.shown(), T::WHAT)))
            }
        }
        deserializer
            .deserialize_any(ScalarVisitor(std::marker::PhantomData))
            .map(Scalar)
    }
}

/// `deserialize_with` for a number or boolean field (see [`Scalar`]).
pub fn scalar<'de, D: Deserializer<'de>, T: ScalarKind>(d: D) -> Result<T, D::Error> {
    Scalar::<T>::deserialize(d).map(|s| s.0)
}

/// `deserialize_with` for an optional number or boolean field (see [`Scalar`]).
pub fn opt_scalar<'de, D: Deserializer<'de>, T: ScalarKind>(d: D) -> Result<Option<T>, D::Error> {
    Option::<Scalar<T>>::deserialize(d).map(|o| o.map(|s| s.0))
}

/// A size leaf in bytes: an integer or a string with a unit (`64KiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeValue(pub u64);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SizeValue, D::Error> {
        deserialize_unit_value(
            deserializer,
            "size",
            "a size is a whole number of bytes or has a unit; write e.g. `1536KiB`",
            Ok,
            parse_size,
        )
        .map(SizeValue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("9001".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn durations_with_each_unit_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Ok(Duration::from_millis(3_723_004))
        );
    }

    #[test]
    fn decimal_durations_parse_to_whole_milliseconds() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h0.5m"), Ok(Duration::from_secs(7230)));
        assert_eq!(parse_duration("1.500s"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn bare_number_duration_says_to_add_a_unit() {
        let err = parse_duration("30").unwrap_err();
        assert!(
            err.contains("needs a unit") && err.contains("`30s`"),
            "{err}"
        );
        assert!(parse_duration("0").is_err());
    }

    #[test]
    fn malformed_durations_are_refused() {
        for bad in [
            "",
            "s",
            "1.5",
            "1.s",
            ".5s",
            "1.0005s",
            "0.5ms",
            "1x",
            "1 s",
            "-1s",
            "1s1m",
            "1s1s",
            "1m30",
            "99999999999999999999s",
            "18446744073709551615h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("16KB"), Ok(16_000));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn oversized_and_malformed_sizes_are_refused() {
        assert!(
            parse_size("99999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_size("17179869184GiB")
                .unwrap_err()
                .contains("too large")
        );
        for bad in ["", "KiB", "1.5MiB", "1kib", "1 XB", "-1", "1MiBB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn formatted_values_read_back() {
        assert_eq!(fmt_duration(Duration::from_millis(90_250)), "1m30s250ms");
        assert_eq!(fmt_duration(Duration::ZERO), "0s");
        assert_eq!(fmt_size(16 * 1024), "16KiB");
        assert_eq!(fmt_size(125), "125B");
        assert_eq!(fmt_size(0), "0B");
    }

    #[test]
    fn interpolation_replaces_variables_and_keeps_escapes() {
        assert_eq!(
            interpolate("host:${PORT}", &env),
            Ok(("host:9001".to_string(), true))
        );
        assert_eq!(
            interpolate("a$${PORT}b", &env),
            Ok(("a${PORT}b".into(), false))
        );
        assert_eq!(
            interpolate("$5 and $", &env),
            Ok(("$5 and $".into(), false))
        );
        assert_eq!(interpolate("${EMPTY}x", &env), Ok(("x".into(), true)));
        assert_eq!(interpolate("plain", &env), Ok(("plain".into(), false)));
    }

    #[test]
    fn interpolation_errors_name_the_problem() {
        let missing = interpolate("${NOPE}", &env).unwrap_err();
        assert!(missing.contains("`NOPE` is not set"), "{missing}");
        assert!(
            interpolate("${PORT", &env)
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            interpolate("${1X}", &env)
                .unwrap_err()
                .contains("invalid variable name")
        );
        assert!(
            interpolate("${}", &env)
                .unwrap_err()
                .contains("invalid variable name")
        );
    }

    #[test]
    fn text_debug_redacts_substituted_values() {
        let text = Text {
            value: "hunter2".into(),
            template: Some("${SECRET}".into()),
        };
        let shown = format!("{text:?} {}", text.shown());
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    proptest! {
        #[test]
        fn duration_parser_never_panics(s in "\\PC*") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn duration_parser_never_panics_on_near_misses(s in "[0-9hms.\\- ]{0,24}") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn compound_durations_add_up(h in 0u64..1000, m in 0u64..1000, s in 0u64..1000, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{s}s{ms}ms");
            let want = Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + ms);
            prop_assert_eq!(parse_duration(&text), Ok(want));
        }

        #[test]
        fn formatted_durations_round_trip(ms in 0u64..(u64::MAX / 4)) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&fmt_duration(d)), Ok(d));
        }

        #[test]
        fn size_parser_never_panics(s in "\\PC*") {
            let _ = parse_size(&s);
        }

        #[test]
        fn sizes_scale_by_their_unit_or_overflow(n in any::<u64>(), unit in 0usize..SIZE_UNITS.len()) {
            let (name, factor) = SIZE_UNITS[unit];
            let got = parse_size(&format!("{n}{name}"));
            match n.checked_mul(factor) {
                Some(bytes) => prop_assert_eq!(got, Ok(bytes)),
                None => prop_assert!(got.is_err()),
            }
        }

        #[test]
        fn formatted_sizes_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_size(&fmt_size(n)), Ok(n));
        }

        #[test]
        fn interpolation_never_panics(s in "\\PC*") {
            let _ = interpolate(&s, &env);
        }

        #[test]
        fn text_without_dollar_is_unchanged(s in "[^$]*") {
            prop_assert_eq!(interpolate(&s, &env), Ok((s.clone(), false)));
        }

        #[test]
        fn escaped_references_come_back_literally(name in "[A-Za-z_][A-Za-z0-9_]{0,8}", pre in "[a-z]{0,4}") {
            let text = format!("{pre}$${{{name}}}");
            prop_assert_eq!(interpolate(&text, &env), Ok((format!("{pre}${{{name}}}"), false)));
        }
    }
}
