//! Model prices, from a TOML table: what each attempt cost and what a job will cost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Price of one model in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Input read from the provider's prompt cache (default: the input price).
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
    /// Input written to the prompt cache (Anthropic; default: the input price).
    #[serde(default)]
    pub cache_write_per_mtok: Option<f64>,
    /// Through the provider's Batch API.
    #[serde(default)]
    pub batch_input_per_mtok: Option<f64>,
    #[serde(default)]
    pub batch_output_per_mtok: Option<f64>,
}

/// Tokens of one call, as they are priced.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub input: u32,
    pub output: u32,
    pub cached: u32,
    pub cache_write: u32,
}

/// Prices by model name (`model`, or `provider/model` where one provider
/// charges differently). A job whose model has no price is refused at submit
/// unless the user allows it; its cost is then reported as unknown.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PriceTable {
    /// When the prices were read, and where.
    #[serde(default)]
    pub as_of: Option<String>,
    #[serde(default)]
    pub sources: Vec<String>,
    #[serde(default)]
    pub models: HashMap<String, Price>,
}

#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("cannot read the price table {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid price table {path}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("price table {path}: prices of {model} must be finite and not negative")]
    Invalid { path: String, model: String },
}

/// The price table's path when none is named: a checkout's.
pub const DEFAULT_PATH: &str = "deploy/prices.toml";

/// Where a price table is looked for when `SLUICE_PRICES_FILE` (or
/// `--prices-file`) names none and the checkout's is not there, in order:
/// the user's config directory (`$XDG_CONFIG_HOME/sluice/prices.toml`, or
/// `~/.config/sluice/prices.toml`), `/etc/sluice/prices.toml`, and the
/// binary's own directory.
pub fn places(config_home: Option<PathBuf>, home: Option<PathBuf>, exe_dir: Option<PathBuf>) -> Vec<PathBuf> {
    let config = config_home.or_else(|| home.map(|h| h.join(".config")));
    let mut out: Vec<PathBuf> = config.map(|c| c.join("sluice/prices.toml")).into_iter().collect();
    out.push(PathBuf::from("/etc/sluice/prices.toml"));
    out.extend(exe_dir.map(|d| d.join("prices.toml")));
    out
}

/// A price table and where it was found, or (`table` empty) where Sluice
/// looked for one.
#[derive(Debug)]
pub struct Located {
    pub table: Option<(PriceTable, PathBuf)>,
    pub looked: Vec<PathBuf>,
}

impl PriceTable {
    /// Loads a table like:
    /// ```toml
    /// [models.gpt-4o-mini]
    /// input_per_mtok = 0.15
    /// output_per_mtok = 0.60
    /// ```
    pub fn load(path: &Path) -> Result<Self, PriceError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PriceError::Read { path: p.clone(), source })?;
        let table: PriceTable =
            toml::from_str(&text).map_err(|source| PriceError::Parse { path: p.clone(), source })?;
        for (model, price) in &table.models {
            let ok = |v: f64| v.is_finite() && v >= 0.0;
            let optional = [
                price.cached_input_per_mtok,
                price.cache_write_per_mtok,
                price.batch_input_per_mtok,
                price.batch_output_per_mtok,
            ];
            if !ok(price.input_per_mtok) || !ok(price.output_per_mtok) || !optional.into_iter().flatten().all(ok) {
                return Err(PriceError::Invalid { path: p, model: model.clone() });
            }
        }
        Ok(table)
    }

    /// The price of `model` at `provider`: `provider/model` first, then `model`.
    pub fn get(&self, provider: &str, model: &str) -> Option<&Price> {
        self.models.get(&format!("{provider}/{model}")).or_else(|| self.models.get(model))
    }

    /// Loads `path`, or where it is the default (`deploy/prices.toml`, a
    /// checkout's) and missing, the first table of [`places`]; with none
    /// there either, an empty table: every model is then unpriced, and a
    /// warning names where Sluice looked.
    pub fn load_or_empty(path: &Path) -> Result<Self, PriceError> {
        let found = Self::locate(path)?;
        if found.table.is_none() {
            let looked: Vec<String> = found.looked.iter().map(|p| p.display().to_string()).collect();
            tracing::warn!(looked = %looked.join(", "), "no price table: every model is unpriced (set SLUICE_PRICES_FILE)");
        }
        Ok(found.table.map(|(t, _)| t).unwrap_or_default())
    }

    /// [`PriceTable::load_or_empty`], saying where the table was found, or
    /// where Sluice looked.
    pub fn locate(path: &Path) -> Result<Located, PriceError> {
        if !path.ends_with(DEFAULT_PATH) || path.exists() {
            return Ok(Located { table: Some((Self::load(path)?, path.to_path_buf())), looked: vec![] });
        }
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
        let mut looked = vec![path.to_path_buf()];
        for place in places(env("XDG_CONFIG_HOME"), env("HOME"), exe_dir) {
            if place.exists() {
                return Ok(Located { table: Some((Self::load(&place)?, place)), looked });
            }
            looked.push(place);
        }
        Ok(Located { table: None, looked })
    }

    /// Priced models whose names are closest to `model` (a typo's fix),
    /// best first, at most three.
    pub fn closest(&self, model: &str) -> Vec<String> {
        let bare = |k: &str| k.rsplit('/').next().unwrap_or(k).to_string();
        let wanted = bare(model);
        let mut near: Vec<(usize, String)> = self
            .models
            .keys()
            .map(|k| (strsim::levenshtein(&wanted, &bare(k)), k.clone()))
            .filter(|(d, k)| *d > 0 && *d <= (bare(k).len() / 4).max(2))
            .collect();
        near.sort();
        near.into_iter().take(3).map(|(_, k)| k).collect()
    }

    /// Cost of one call in US dollars, `None` when the model has no price.
    pub fn cost(&self, provider: &str, model: &str, u: Usage) -> Option<f64> {
        let p = self.get(provider, model)?;
        let cached = u.cached.min(u.input);
        let written = u.cache_write.min(u.input - cached);
        let plain = u.input - cached - written;
        Some(
            (plain as f64 * p.input_per_mtok
                + cached as f64 * p.cached_input_per_mtok.unwrap_or(p.input_per_mtok)
                + written as f64 * p.cache_write_per_mtok.unwrap_or(p.input_per_mtok)
                + u.output as f64 * p.output_per_mtok)
                / 1_000_000.0,
        )
    }
}

impl PriceTable {
    /// Cost of one request answered through the provider's batch API: the
    /// batch prices where the table has them, else the live ones. Prompt
    /// caching is not counted apart (batch prices are flat).
    pub fn batch_cost(&self, provider: &str, model: &str, u: Usage) -> Option<f64> {
        let p = self.get(provider, model)?;
        let input = p.batch_input_per_mtok.unwrap_or(p.input_per_mtok);
        let output = p.batch_output_per_mtok.unwrap_or(p.output_per_mtok);
        Some((u.input as f64 * input + u.output as f64 * output) / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_price_table_is_looked_for_in_one_documented_order() {
        let p = |s: &str| Some(PathBuf::from(s));
        // XDG_CONFIG_HOME, HOME, the binary's directory: the places, in order
        for (xdg, home, exe, places_) in [
            (p("/x"), p("/h"), p("/b"), vec!["/x/sluice/prices.toml", "/etc/sluice/prices.toml", "/b/prices.toml"]),
            (
                None,
                p("/h"),
                p("/b"),
                vec!["/h/.config/sluice/prices.toml", "/etc/sluice/prices.toml", "/b/prices.toml"],
            ),
            (None, None, None, vec!["/etc/sluice/prices.toml"]),
        ] {
            let got: Vec<String> = places(xdg, home, exe).iter().map(|p| p.display().to_string()).collect();
            assert_eq!(got, places_);
        }
    }

    #[test]
    fn a_missing_default_table_says_where_it_was_looked_for_and_a_named_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join(DEFAULT_PATH);
        let found = PriceTable::locate(&default).unwrap();
        if found.table.is_none() {
            assert_eq!(found.looked[0], default);
            assert!(found.looked.contains(&PathBuf::from("/etc/sluice/prices.toml")), "{:?}", found.looked);
        }
        assert!(PriceTable::locate(&dir.path().join("mine.toml")).is_err(), "a named table must exist");
    }

    #[test]
    fn an_unknown_model_gets_the_closest_priced_names() {
        let t = PriceTable::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prices.toml")).unwrap();
        assert_eq!(t.closest("gpt-4o-mni").first().map(String::as_str), Some("gpt-4o-mini"));
        assert_eq!(t.closest("openai/gpt-4o-mni").first().map(String::as_str), Some("gpt-4o-mini"));
        assert!(t.closest("gpt-4o-mini").iter().all(|m| m != "gpt-4o-mini"), "a priced name is no typo");
        assert!(t.closest("something-else-entirely").is_empty());
    }

    #[test]
    fn shipped_table_loads_and_prices_calls() {
        let t = PriceTable::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prices.toml")).unwrap();
        let u = |input, output, cached| Usage { input, output, cached, cache_write: 0 };
        assert!(t.cost("default", "sim-small", u(1_000_000, 0, 0)).unwrap() > 0.0);
        assert_eq!(t.cost("default", "no-such-model", u(1000, 1000, 0)), None);
        let p = t.models["sim-small"];
        let c = t.cost("default", "sim-small", u(2_000, 500, 0)).unwrap();
        assert!((c - (2_000.0 * p.input_per_mtok + 500.0 * p.output_per_mtok) / 1e6).abs() < 1e-12);
        // Cached input is cheaper; real models are priced, with their source named.
        let full = t.cost("openai", "gpt-4o-mini", u(1_000_000, 0, 0)).unwrap();
        let cached = t.cost("openai", "gpt-4o-mini", u(1_000_000, 0, 1_000_000)).unwrap();
        assert!(cached < full, "{cached} {full}");
        for model in ["gpt-5-mini", "o4-mini", "claude-sonnet-4-5", "claude-haiku-4-5"] {
            assert!(t.get("x", model).is_some_and(|p| p.batch_input_per_mtok.is_some()), "{model}");
        }
        assert!(t.as_of.is_some() && !t.sources.is_empty());
    }

    /// Reasoning is paid for once, as output: the figures below are the
    /// shipped prices applied by hand to each dialect's usage fields.
    #[test]
    fn reasoning_tokens_are_priced_once_as_output_in_both_dialects() {
        let t = PriceTable::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prices.toml")).unwrap();
        // OpenAI: 50 completion tokens of which 40 reasoned; 64 of 100 prompt tokens cached.
        let openai = crate::provider::openai::parse(
            br#"{"model":"o4-mini","choices":[{"message":{"content":"{}"}}],
                "usage":{"prompt_tokens":100,"completion_tokens":50,
                  "prompt_tokens_details":{"cached_tokens":64},"completion_tokens_details":{"reasoning_tokens":40}}}"#,
        )
        .unwrap();
        assert_eq!(openai.tokens_reasoning, 40);
        let cost = t.cost("openai", "o4-mini", openai.usage()).unwrap();
        // 36 x $1.10 + 64 x $0.275 + 50 x $4.40 per million.
        assert!((cost - 277.2e-6).abs() < 1e-12, "{cost}");
        // Anthropic: output_tokens counts the thinking block; input is split
        // into plain, cache reads and cache writes.
        let anthropic = crate::provider::anthropic::parse(
            br#"{"type":"message","role":"assistant","model":"claude-sonnet-4-5",
                "content":[{"type":"thinking","thinking":"Sport, clearly.","signature":"s"},
                           {"type":"text","text":"{\"label\":\"sports\"}"}],
                "usage":{"input_tokens":50,"output_tokens":300,
                  "cache_read_input_tokens":100,"cache_creation_input_tokens":20}}"#,
        )
        .unwrap();
        assert_eq!(anthropic.content, r#"{"label":"sports"}"#);
        let cost = t.cost("anthropic", "claude-sonnet-4-5", anthropic.usage()).unwrap();
        // 50 x $3 + 100 x $0.30 + 20 x $3.75 + 300 x $15 per million.
        assert!((cost - 4755e-6).abs() < 1e-12, "{cost}");
    }

    #[test]
    fn negative_prices_are_refused() {
        let dir = std::env::temp_dir().join(format!("sluice-prices-{}", std::process::id()));
        std::fs::write(&dir, "[models.x]\ninput_per_mtok = -1\noutput_per_mtok = 1\n").unwrap();
        let err = PriceTable::load(&dir).unwrap_err().to_string();
        std::fs::remove_file(&dir).ok();
        assert!(err.contains("must be finite and not negative"), "{err}");
    }
}
