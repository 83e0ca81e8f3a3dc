//! The providers file: which model endpoints exist, how to reach them, their limits and the parameter rules of each model.
//!
//! ```toml
//! [providers.openai]
//! kind = "openai"                      # openai | anthropic | azure_openai | openai_compatible
//! api_key_env = "OPENAI_API_KEY"       # or api_key_file = "/run/secrets/openai"; several keys allowed
//!
//! [providers.openai.models."gpt-4o-mini"]
//! rpm = 5000
//! tpm = 2000000
//!
//! [providers.openai.models."o4-mini"]
//! rpm = 1000
//! max_tokens_param = "max_completion_tokens"
//! unsupported = ["temperature", "top_p", "logprobs", "n"]
//! reasoning = true
//! ```
//!
//! A job kind names `provider/model` (or a bare model, found in the one
//! provider that has it). A model entry named `"*"` stands for any model of
//! that provider. Both the coordinator (to refuse a job naming what is not
//! configured) and the workers (to call it) read the same file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// The providers file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Where the catalog came from, for messages.
    #[serde(skip)]
    pub source: String,
}

/// The API dialect of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI's Chat Completions API.
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// Azure OpenAI: deployment URLs, `api-version`, an `api-key` header.
    AzureOpenai,
    /// A self-hosted or proxy server speaking the Chat Completions API (vLLM,
    /// Ollama, llama.cpp server, LiteLLM): structured output is negotiated.
    OpenaiCompatible,
}

impl ProviderKind {
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::Openai => Some("https://api.openai.com/v1"),
            ProviderKind::Anthropic => Some("https://api.anthropic.com/v1"),
            _ => None,
        }
    }
}

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Base URL: `https://api.openai.com/v1`, `https://api.anthropic.com/v1`,
    /// `https://RESOURCE.openai.azure.com/openai`, `http://127.0.0.1:8000/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Environment variable holding the API key (several: comma-separated).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the API key (several: one per line).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Azure OpenAI's `api-version` query parameter.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Anthropic's `anthropic-version` header.
    #[serde(default)]
    pub anthropic_version: Option<String>,
    /// Timeout of one call in milliseconds (default: the worker's).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    pub models: BTreeMap<String, ModelConfig>,
}

/// Which request field carries the output token limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensParam {
    #[default]
    MaxTokens,
    /// OpenAI's reasoning models refuse `max_tokens`.
    MaxCompletionTokens,
}

/// A request parameter a model refuses; Sluice leaves it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Param {
    Temperature,
    TopP,
    /// No `logprobs`: confidence comes from the kind's next strategy.
    Logprobs,
    /// No `n` > 1: agreement cannot be computed from one call.
    N,
    /// No `response_format: json_schema` (start the negotiation at `json_object`).
    JsonSchema,
    /// No `response_format` at all (the schema goes into the prompt).
    ResponseFormat,
}

/// Structured output as requested from the model, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    /// `response_format: {type: json_schema}` (OpenAI), or a forced tool (Anthropic).
    JsonSchema,
    /// `response_format: {type: json_object}`, the schema in the prompt.
    JsonObject,
    /// No response format: the schema in the prompt only.
    Prompt,
}

impl OutputMode {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputMode::JsonSchema => "json_schema",
            OutputMode::JsonObject => "json_object",
            OutputMode::Prompt => "prompt",
        }
    }

    /// The next weaker mode, if any.
    pub fn weaker(self) -> Option<OutputMode> {
        match self {
            OutputMode::JsonSchema => Some(OutputMode::JsonObject),
            OutputMode::JsonObject => Some(OutputMode::Prompt),
            OutputMode::Prompt => None,
        }
    }

    pub fn parse(s: &str) -> Option<OutputMode> {
        match s {
            "json_schema" => Some(OutputMode::JsonSchema),
            "json_object" => Some(OutputMode::JsonObject),
            "prompt" => Some(OutputMode::Prompt),
            _ => None,
        }
    }
}

/// Limits and parameter rules of one model at one provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Requests per minute for the whole cluster (0: none).
    #[serde(default)]
    pub rpm: f64,
    /// Tokens per minute, prompt plus max output (0: none).
    #[serde(default)]
    pub tpm: f64,
    /// Input tokens per minute, where the provider limits them apart (Anthropic).
    #[serde(default)]
    pub input_tpm: f64,
    /// Output tokens per minute, where the provider limits them apart (Anthropic).
    #[serde(default)]
    pub output_tpm: f64,
    /// Calls in flight across the cluster at most (0: only the adaptive window).
    #[serde(default)]
    pub max_in_flight: u32,
    /// Azure OpenAI deployment name (default: the model name).
    #[serde(default)]
    pub deployment: Option<String>,
    #[serde(default)]
    pub max_tokens_param: MaxTokensParam,
    /// Parameters the model refuses.
    #[serde(default)]
    pub unsupported: Vec<Param>,
    /// The model takes `reasoning_effort` (OpenAI o-series, gpt-5 family).
    #[serde(default)]
    pub reasoning: bool,
    /// Batch APIs: prompt tokens the provider holds in its batch queue for
    /// this model at most, across the cluster (0: none). OpenAI's "batch
    /// queue limit", per model and organization; a batch past it fails with
    /// `token_limit_exceeded` ("Enqueued token limit reached for MODEL ...",
    /// openai/openai-python#2084).
    #[serde(default)]
    pub batch_queue_tokens: f64,
    /// Batch APIs: requests the provider holds in its batch queue for this
    /// model at most, across the cluster (0: none). Anthropic's "batch
    /// requests in processing queue" of the Message Batches API's own limits
    /// (<https://docs.anthropic.com/en/api/rate-limits>).
    #[serde(default)]
    pub batch_queue_requests: f64,
}

impl ModelConfig {
    pub fn supports(&self, p: Param) -> bool {
        !self.unsupported.contains(&p)
    }

    /// The strongest structured-output mode worth trying.
    pub fn first_output_mode(&self) -> OutputMode {
        if !self.supports(Param::ResponseFormat) {
            OutputMode::Prompt
        } else if !self.supports(Param::JsonSchema) {
            OutputMode::JsonObject
        } else {
            OutputMode::JsonSchema
        }
    }
}

/// A job's model resolved against the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct Target<'a> {
    pub provider: &'a str,
    /// The model name as the provider knows it.
    pub model: &'a str,
    pub config: &'a ModelConfig,
}

impl Target<'_> {
    /// `provider/model`, as results and metrics name it.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the providers file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid providers file {path}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("providers file {path}: {field}: {message}")]
    Field { path: String, field: String, message: String },
}

/// The name of the provider the one-provider shorthand (`SLUICE_MODEL_BASE_URL`) defines.
pub const SHORTHAND: &str = "default";

impl Catalog {
    /// Reads and checks a providers file (keys are not read here: see [`Catalog::keys`]).
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read { path: p.clone(), source })?;
        let mut catalog: Catalog =
            toml::from_str(&text).map_err(|source| CatalogError::Parse { path: p.clone(), source })?;
        catalog.source = p;
        catalog.validate()?;
        // What the Messages API cannot do at all, whatever the model.
        for p in catalog.providers.values_mut().filter(|p| p.kind == ProviderKind::Anthropic) {
            for m in p.models.values_mut() {
                for param in [Param::Logprobs, Param::N] {
                    if !m.unsupported.contains(&param) {
                        m.unsupported.push(param);
                    }
                }
            }
        }
        Ok(catalog)
    }

    /// The one-provider shorthand: any model at `base_url`, with the same limits for each.
    pub fn shorthand(base_url: &str, limits: ModelConfig) -> Self {
        let provider = ProviderConfig {
            kind: ProviderKind::OpenaiCompatible,
            base_url: Some(base_url.to_string()),
            api_key_env: None,
            api_key_file: None,
            api_version: None,
            anthropic_version: None,
            timeout_ms: None,
            models: BTreeMap::from([("*".to_string(), limits)]),
        };
        Catalog {
            providers: BTreeMap::from([(SHORTHAND.to_string(), provider)]),
            source: "SLUICE_MODEL_BASE_URL".into(),
        }
    }

    fn field_error(&self, field: String, message: impl Into<String>) -> CatalogError {
        CatalogError::Field { path: self.source.clone(), field, message: message.into() }
    }

    fn validate(&self) -> Result<(), CatalogError> {
        if self.providers.is_empty() {
            return Err(self.field_error("providers".into(), "no provider is configured"));
        }
        for (name, p) in &self.providers {
            let at = |f: &str| format!("providers.{name}.{f}");
            if name.is_empty() || name.contains(['/', '.', ' ']) {
                return Err(self.field_error(
                    format!("providers.{name}"),
                    "a provider name may not be empty or contain '/', '.' or spaces",
                ));
            }
            match p.base_url.as_deref().or(p.kind.default_base_url()) {
                None => return Err(self.field_error(at("base_url"), "is required for this kind")),
                Some(u) if !u.starts_with("http://") && !u.starts_with("https://") => {
                    return Err(self.field_error(at("base_url"), format!("must be an http(s) URL, got {u:?}")))
                }
                _ => {}
            }
            if p.kind == ProviderKind::AzureOpenai && p.api_version.is_none() {
                return Err(self.field_error(at("api_version"), "is required for azure_openai (e.g. \"2024-10-21\")"));
            }
            if p.api_key_env.is_some() && p.api_key_file.is_some() {
                return Err(self.field_error(at("api_key_file"), "give api_key_env or api_key_file, not both"));
            }
            if p.models.is_empty() {
                return Err(self.field_error(at("models"), "lists no model"));
            }
            for (model, m) in &p.models {
                let limits = [m.rpm, m.tpm, m.input_tpm, m.output_tpm, m.batch_queue_tokens, m.batch_queue_requests];
                if limits.iter().any(|v| !v.is_finite() || *v < 0.0) {
                    return Err(self.field_error(
                        format!("providers.{name}.models.{model:?}"),
                        "limits must be 0 (none) or positive",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Finds `reference` (`provider/model`, or a model only one provider has).
    pub fn resolve<'a>(&'a self, reference: &'a str) -> Result<Target<'a>, String> {
        if let Some((provider, model)) = reference.split_once('/') {
            if let Some(p) = self.providers.get(provider) {
                return lookup(provider, p, model).ok_or_else(|| {
                    format!("provider {provider:?} has no model {model:?}; configured: {}", self.describe())
                });
            }
        }
        let mut found = self
            .providers
            .iter()
            .filter_map(|(name, p)| p.models.contains_key(reference).then(|| lookup(name, p, reference)).flatten());
        match (found.next(), found.next()) {
            (Some(t), None) => Ok(t),
            (Some(_), Some(_)) => {
                Err(format!("model {reference:?} is offered by several providers: write it as provider/model"))
            }
            (None, _) => {
                // A provider that takes any model, if it is the only one.
                let mut any = self.providers.iter().filter(|(_, p)| p.models.contains_key("*"));
                match (any.next(), any.next(), self.providers.len()) {
                    (Some((name, p)), None, 1) => lookup(name, p, reference)
                        .ok_or_else(|| format!("no provider offers {reference:?}; configured: {}", self.describe())),
                    _ => Err(format!("no provider offers {reference:?}; configured: {}", self.describe())),
                }
            }
        }
    }

    /// What is configured, for messages: `openai/gpt-4o-mini, anthropic/claude-...`.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        for (name, p) in &self.providers {
            for model in p.models.keys() {
                out.push(if model == "*" { format!("{name}/* (any model)") } else { format!("{name}/{model}") });
            }
        }
        out.join(", ")
    }

    /// Reads the API keys of a provider, once, at start-up. No key is fine (a local server).
    pub fn keys(&self, name: &str) -> Result<Vec<SecretString>, CatalogError> {
        let p = &self.providers[name];
        let text = if let Some(path) = &p.api_key_file {
            std::fs::read_to_string(path).map_err(|e| {
                self.field_error(
                    format!("providers.{name}.api_key_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
        } else if let Some(var) = &p.api_key_env {
            std::env::var(var)
                .map_err(|_| self.field_error(format!("providers.{name}.api_key_env"), format!("{var} is not set")))?
                .replace(',', "\n")
        } else {
            String::new()
        };
        Ok(text.lines().map(str::trim).filter(|k| !k.is_empty()).map(|k| SecretString::from(k.to_string())).collect())
    }
}

fn lookup<'a>(provider: &'a str, p: &'a ProviderConfig, model: &'a str) -> Option<Target<'a>> {
    let config = p.models.get(model).or_else(|| p.models.get("*"))?;
    Some(Target { provider, model, config })
}

impl ProviderConfig {
    pub fn base_url(&self) -> &str {
        self.base_url.as_deref().or(self.kind.default_base_url()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile_path::Guard, PathBuf) {
        tempfile_path::write(text)
    }

    /// A file in the temp folder removed when dropped (no extra dependency).
    mod tempfile_path {
        use std::path::PathBuf;
        pub struct Guard(pub PathBuf);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        pub fn write(text: &str) -> (Guard, PathBuf) {
            let path = std::env::temp_dir().join(format!("sluice-providers-{}.toml", uuid::Uuid::new_v4().simple()));
            std::fs::write(&path, text).unwrap();
            (Guard(path.clone()), path)
        }
    }

    const GOOD: &str = r#"
[providers.openai]
kind = "openai"
api_key_env = "SLUICE_TEST_UNSET_KEY_VAR"
[providers.openai.models."gpt-4o-mini"]
rpm = 500
[providers.openai.models."o4-mini"]
max_tokens_param = "max_completion_tokens"
unsupported = ["temperature", "logprobs"]
reasoning = true

[providers.claude]
kind = "anthropic"
[providers.claude.models."claude-haiku-4-5"]
input_tpm = 50000
output_tpm = 10000

[providers.local]
kind = "openai_compatible"
base_url = "http://127.0.0.1:8000/v1"
[providers.local.models."Qwen/Qwen2.5-7B-Instruct"]
"#;

    #[test]
    fn resolves_provider_and_bare_model_names() {
        let (_g, path) = write(GOOD);
        let c = Catalog::load(&path).unwrap();
        let t = c.resolve("openai/o4-mini").unwrap();
        assert_eq!((t.provider, t.model), ("openai", "o4-mini"));
        assert_eq!(t.config.max_tokens_param, MaxTokensParam::MaxCompletionTokens);
        assert_eq!(c.resolve("claude-haiku-4-5").unwrap().provider, "claude");
        // A model name with a slash that is not a provider prefix.
        assert_eq!(c.resolve("local/Qwen/Qwen2.5-7B-Instruct").unwrap().model, "Qwen/Qwen2.5-7B-Instruct");
        assert_eq!(c.resolve("Qwen/Qwen2.5-7B-Instruct").unwrap().provider, "local");
        let err = c.resolve("openai/gpt-9").unwrap_err();
        assert!(err.contains("openai/gpt-4o-mini") && err.contains("claude/claude-haiku-4-5"), "{err}");
        let err = c.resolve("mistral/large").unwrap_err();
        assert!(err.contains("no provider offers"), "{err}");
    }

    #[test]
    fn the_shipped_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/providers.example.toml");
        let c = Catalog::load(&path).unwrap();
        assert_eq!(c.resolve("openai/o4-mini").unwrap().config.max_tokens_param, MaxTokensParam::MaxCompletionTokens);
        let claude = c.resolve("claude-haiku-4-5").unwrap();
        assert!(!claude.config.supports(Param::Logprobs) && !claude.config.supports(Param::N));
        assert_eq!(c.resolve("azure/gpt-4o-mini").unwrap().config.deployment.as_deref(), Some("gpt-4o-mini-prod"));
        assert_eq!(c.resolve("local/Qwen/Qwen2.5-7B-Instruct").unwrap().config.max_in_flight, 32);
    }

    #[test]
    fn the_shorthand_takes_any_model() {
        let c = Catalog::shorthand("http://127.0.0.1:7800/v1", ModelConfig { rpm: 60.0, ..Default::default() });
        let t = c.resolve("sim-small").unwrap();
        assert_eq!((t.provider, t.model, t.config.rpm), ("default", "sim-small", 60.0));
        assert_eq!(c.resolve("default/sim-large").unwrap().model, "sim-large");
    }

    #[test]
    fn mistakes_name_the_file_and_the_field() {
        let check = |text: &str, expected: &[&str]| {
            let (_g, path) = write(text);
            let err = match Catalog::load(&path) {
                Ok(c) => c.keys("p").map(|_| ()).unwrap_err(),
                Err(e) => e,
            };
            let msg = crate::error_chain(&err);
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            for e in expected {
                assert!(msg.contains(e), "{msg:?} should mention {e:?}");
            }
        };
        check("[providers.p]\nkind = \"openai\"\nbase_ur = \"x\"\n[providers.p.models.m]\n", &["base_ur", "line 3"]);
        check("[providers.p]\nkind = \"openia\"\n[providers.p.models.m]\n", &["openia", "openai_compatible"]);
        check(
            "[providers.p]\nkind = \"openai\"\napi_key_file = \"/nonexistent/key\"\n[providers.p.models.m]\n",
            &["providers.p.api_key_file", "/nonexistent/key"],
        );
        check("[providers.p]\nkind = \"openai_compatible\"\n[providers.p.models.m]\n", &["providers.p.base_url"]);
        check(
            "[providers.p]\nkind = \"azure_openai\"\nbase_url = \"https://x.openai.azure.com/openai\"\n[providers.p.models.m]\n",
            &["providers.p.api_version"],
        );
        check(
            "[providers.p]\nkind = \"openai\"\n[providers.p.models.m]\nrpm = -1\n",
            &["providers.p.models", "positive"],
        );
    }
}
