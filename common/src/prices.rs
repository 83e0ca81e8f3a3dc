//! Model prices, from a TOML table: what each attempt cost and what a job will cost.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

/// Price of one model in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

/// Prices by model name. A model missing from the table costs nothing (and
/// is reported as unpriced).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PriceTable {
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
            if !ok(price.input_per_mtok) || !ok(price.output_per_mtok) {
                return Err(PriceError::Invalid { path: p, model: model.clone() });
            }
        }
        Ok(table)
    }

    /// Cost of one call in US dollars.
    pub fn cost(&self, model: &str, tokens_in: u32, tokens_out: u32) -> f64 {
        self.models.get(model).map_or(0.0, |p| {
            (tokens_in as f64 * p.input_per_mtok + tokens_out as f64 * p.output_per_mtok) / 1_000_000.0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_table_loads_and_prices_calls() {
        let t = PriceTable::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prices.toml")).unwrap();
        assert!(t.cost("sim-small", 1_000_000, 0) > 0.0);
        assert_eq!(t.cost("no-such-model", 1000, 1000), 0.0);
        let p = t.models["sim-small"];
        let c = t.cost("sim-small", 2_000, 500);
        assert!((c - (2_000.0 * p.input_per_mtok + 500.0 * p.output_per_mtok) / 1e6).abs() < 1e-12);
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
