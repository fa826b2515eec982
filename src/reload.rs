//! Live configuration reload on SIGHUP.
//!
//! On SIGHUP a thread re-reads the configuration file (`serve --config FILE`, laid over the
//! embedded default as at start) and compares it key by key with the configuration in force:
//! - An invalid file changes nothing: the error (`FILE:LINE: key ...`) is logged and the
//!   configuration in force stays.
//! - Changed keys that can change live ([`is_live_key`]: the `[limits]` rate limits, bounds and
//!   blocklist, `[risk_control]`, the bot's thresholds, handler order and gray-release variants
//!   (weights, handlers, thresholds, models: `[[bot.variants]]`)) are applied together:
//!   the new configuration is published in [`LiveConfig`] and every shard picks it up within
//!   [`SHARD_POLL`], rebuilding what it derived from those keys (see `server::Shard::apply_config`).
//! - Changed keys that need a restart are named in the log and not applied, so the configuration
//!   in force is always one the process could have started with; they are named again at every
//!   reload until the process restarts.
//!
//! TLS certificate and key files are reloaded by their own watcher on the same SIGHUP
//! (`crate::tls`); changing their paths needs a restart.
//!
//! Invariants: a shard's configuration changes only between two events it handles, never in the
//! middle of one (shards poll [`LiveConfig::generation`] from their own task); the hot path reads
//! no lock (the mutex is taken only when the generation moved).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{self, Config, ConfigError, LimitsConfig, VariantModel};

/// How often each shard checks for a reloaded configuration.
pub const SHARD_POLL: Duration = Duration::from_millis(200);

/// The configuration in force, shared by the reload thread (writer) and the shards (readers).
#[derive(Debug)]
pub struct LiveConfig {
    generation: AtomicU64,
    config: Mutex<Arc<Config>>,
}

impl LiveConfig {
    pub fn new(config: Arc<Config>) -> Arc<LiveConfig> {
        Arc::new(LiveConfig {
            generation: AtomicU64::new(0),
            config: Mutex::new(config),
        })
    }

    /// Bumped at every applied reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The configuration in force.
    pub fn current(&self) -> Arc<Config> {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, config: Arc<Config>) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether a changed key (dotted, as `config print` writes it) takes effect without a restart.
pub fn is_live_key(key: &str) -> bool {
    // The blocklist file's content reloads by itself when it changes; its path and poll
    // interval are fixed at start.
    (key.starts_with("limits.")
        && !matches!(key, "limits.blocklist_file" | "limits.blocklist_poll"))
        || key.starts_with("risk_control.")
        || matches!(
            key,
            "bot.confidence_threshold"
                | "bot.margin_threshold"
                | "bot.failed_turns_before_handoff"
                | "bot.handlers"
                | "bot.variants"
        )
}

/// What a reload would do: the configuration to put in force, the changed keys it applies and
/// the changed keys that wait for a restart.
#[derive(Debug)]
pub struct ReloadPlan {
    pub config: Config,
    pub applied: Vec<String>,
    pub needs_restart: Vec<String>,
}

/// Compares `new` with `current`: live keys are taken from `new`, every other key stays as in
/// `current`. `bot.handlers` and `bot.variants` are live only while the bot keeps (or keeps
/// lacking) answer handlers in some variant, since the intent engine is loaded at start only when
/// there are some. A variant list change moves no conversation: each keeps the variant stored
/// with it (`bot::gray`); a variant's `model` applies to the next bot turn of each of its
/// conversations. `bot.variants` also waits for a restart when a variant asks for the companion
/// model (`model = "companion"`) and the running node has none (it is loaded at start only).
pub fn plan(current: &Config, new: &Config) -> ReloadPlan {
    let before = flatten(&current.to_toml());
    let after = flatten(&new.to_toml());
    let mut changed: Vec<String> = before
        .iter()
        .filter(|(key, value)| after.get(*key) != Some(value))
        .map(|(key, _)| key.clone())
        .collect();
    changed.extend(
        after
            .keys()
            .filter(|key| !before.contains_key(*key))
            .cloned(),
    );
    changed.sort();
    changed.dedup();
    let handlers_live = current.bot.has_answer_handlers() == new.bot.has_answer_handlers();
    // The companion model is loaded at start: a variant can only switch to it when it runs.
    let companion_running =
        current.inference.enabled && !current.inference.companion_model.as_os_str().is_empty();
    let models_live = companion_running
        || new
            .bot
            .variants
            .iter()
            .all(|variant| variant.model != Some(VariantModel::Companion));
    let (applied, needs_restart): (Vec<String>, Vec<String>) =
        changed.into_iter().partition(|key| {
            is_live_key(key)
                && (!matches!(key.as_str(), "bot.handlers" | "bot.variants") || handlers_live)
                && (key != "bot.variants" || models_live)
        });
    let mut config = current.clone();
    if applied.iter().any(|key| key.starts_with("limits.")) {
        config.limits = LimitsConfig {
            blocklist_file: current.limits.blocklist_file.clone(),
            blocklist_poll: current.limits.blocklist_poll,
            ..new.limits.clone()
        };
    }
    if applied.iter().any(|key| key.starts_with("risk_control.")) {
        config.risk_control = new.risk_control.clone();
    }
    for key in &applied {
        match key.as_str() {
            "bot.confidence_threshold" => {
                config.bot.confidence_threshold = new.bot.confidence_threshold
            }
            "bot.margin_threshold" => config.bot.margin_threshold = new.bot.margin_threshold,
            "bot.failed_turns_before_handoff" => {
                config.bot.failed_turns_before_handoff = new.bot.failed_turns_before_handoff
            }
            "bot.handlers" => config.bot.handlers = new.bot.handlers.clone(),
            "bot.variants" => config.bot.variants = new.bot.variants.clone(),
            _ => {}
        }
    }
    ReloadPlan {
        config,
        applied,
        needs_restart,
    }
}

/// `section.key` (and `section.table.key` for nested tables) to the value's TOML text.
fn flatten(text: &str) -> BTreeMap<String, String> {
    fn walk(prefix: &str, table: &dyn toml_edit::TableLike, out: &mut BTreeMap<String, String>) {
        for (key, item) in table.iter() {
            let path = if prefix.is_empty() {
                key.to_string()
            } else {
                format!("{prefix}.{key}")
            };
            match item {
                toml_edit::Item::Table(inner) => walk(&path, inner, out),
                toml_edit::Item::Value(toml_edit::Value::InlineTable(inner)) => {
                    walk(&path, inner, out)
                }
                toml_edit::Item::Value(value) => {
                    out.insert(path, value.clone().decorated("", "").to_string());
                }
                toml_edit::Item::ArrayOfTables(array) => {
                    out.insert(path, array.to_string());
                }
                toml_edit::Item::None => {}
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(document) = text.parse::<toml_edit::DocumentMut>() {
        walk("", document.as_table(), &mut out);
    }
    out
}

/// The outcome of one reload, as logged.
#[derive(Debug)]
pub enum Outcome {
    /// The file did not load; nothing changed.
    Refused(ConfigError),
    /// The file loaded; `applied` keys are in force, `needs_restart` keys are not.
    Loaded {
        applied: Vec<String>,
        needs_restart: Vec<String>,
    },
}

/// Re-reads the configuration (`path`, or the embedded default alone; `listen` is the
/// `serve --listen` override, applied again), plans the reload against what `live` holds,
/// publishes it when a live key changed, and logs what happened.
pub fn reload(path: Option<&Path>, listen: Option<SocketAddr>, live: &LiveConfig) -> Outcome {
    let new = match config::load(path) {
        Ok(mut new) => {
            if let Some(listen) = listen {
                new.server.listen = listen;
            }
            new
        }
        Err(err) => {
            tracing::error!(error = %err, "configuration reload refused; nothing changed");
            return Outcome::Refused(err);
        }
    };
    let current = live.current();
    let plan = plan(&current, &new);
    if !plan.needs_restart.is_empty() {
        tracing::warn!(
            keys = %plan.needs_restart.join(", "),
            "configuration reload: these changed keys need a restart and were not applied"
        );
    }
    if plan.applied.is_empty() {
        tracing::info!("configuration reload: no key that changes live was changed");
    } else {
        tracing::info!(
            keys = %plan.applied.join(", "),
            "configuration reloaded; every shard applies it"
        );
        live.publish(Arc::new(plan.config));
    }
    Outcome::Loaded {
        applied: plan.applied,
        needs_restart: plan.needs_restart,
    }
}

/// Starts the thread that reloads on SIGHUP (which then no longer ends the process).
pub fn spawn(
    path: Option<PathBuf>,
    listen: Option<SocketAddr>,
    live: Arc<LiveConfig>,
) -> std::io::Result<()> {
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hangup.clone())?;
    std::thread::Builder::new()
        .name("switchboard-reload".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            if hangup.swap(false, Ordering::AcqRel) {
                reload(path.as_deref(), listen, &live);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(overlay: &str) -> Config {
        let text = format!("{}\n", overlay);
        config::load_str("test.toml", &text).unwrap()
    }

    #[test]
    fn nothing_changed_plans_nothing() {
        let current = config("");
        let plan = plan(&current, &config(""));
        assert!(plan.applied.is_empty() && plan.needs_restart.is_empty());
        assert_eq!(plan.config, current);
    }

    #[test]
    fn live_keys_are_applied_and_the_others_wait_for_a_restart() {
        let current = config("");
        let new = config(
            "[limits]\nvisitor_messages_per_second = 1.0\nvisitor_message_burst = 1\n\
             [websocket]\nping_interval = \"7s\"\n\
             [bot]\nconfidence_threshold = 0.9\nmin_similarity = 0.6\n\
             [risk_control]\nblocked_words = [\"scam\"]\n",
        );
        let plan = plan(&current, &new);
        assert_eq!(
            plan.applied,
            [
                "bot.confidence_threshold",
                "limits.visitor_message_burst",
                "limits.visitor_messages_per_second",
                "risk_control.blocked_words",
            ]
        );
        assert_eq!(
            plan.needs_restart,
            ["bot.min_similarity", "websocket.ping_interval"]
        );
        assert_eq!(plan.config.limits, new.limits);
        assert_eq!(plan.config.risk_control, new.risk_control);
        assert_eq!(plan.config.bot.confidence_threshold, 0.9);
        assert_eq!(plan.config.bot.min_similarity, current.bot.min_similarity);
        assert_eq!(plan.config.websocket, current.websocket);
        // Planned again against what is in force, the restart keys are still named.
        let again = super::plan(&plan.config, &new);
        assert!(again.applied.is_empty());
        assert_eq!(again.needs_restart, plan.needs_restart);
    }

    #[test]
    fn handler_order_is_live_unless_the_bot_gains_or_loses_its_answer_handlers() {
        let current = config("");
        let reordered = config(
            "[bot]\nhandlers = [\"risk_control\", \"human_transfer\", \"fallback\", \"intent\"]\n",
        );
        let plan = plan(&current, &reordered);
        assert_eq!(plan.applied, ["bot.handlers"]);
        assert_eq!(plan.config.bot.handlers, reordered.bot.handlers);
        let guards_only = config("[bot]\nhandlers = [\"risk_control\"]\n");
        let plan = super::plan(&current, &guards_only);
        assert_eq!(plan.needs_restart, ["bot.handlers"]);
        assert_eq!(plan.config.bot.handlers, current.bot.handlers);
    }

    #[test]
    fn gray_release_variants_change_live() {
        let current = config("");
        let split = config(
            "[[bot.variants]]\nname = \"a\"\nweight = 90\n\
             [[bot.variants]]\nname = \"b\"\nweight = 10\nhandlers = [\"echo\"]\n",
        );
        let plan = plan(&current, &split);
        assert_eq!(plan.applied, ["bot.variants"]);
        assert!(plan.needs_restart.is_empty());
        assert_eq!(plan.config.bot.variants, split.bot.variants);
        let reweighted = config(
            "[[bot.variants]]\nname = \"a\"\nweight = 0\n\
             [[bot.variants]]\nname = \"b\"\nweight = 10\nhandlers = [\"echo\"]\n",
        );
        let again = super::plan(&plan.config, &reweighted);
        assert_eq!(again.applied, ["bot.variants"]);
        assert_eq!(again.config.bot.variants[0].weight, 0.0);
        // Variants whose chains have no answer handler would leave the engine unloaded.
        let guards_only = config(
            "[bot]\nhandlers = [\"risk_control\"]\n\
             [[bot.variants]]\nname = \"a\"\nweight = 1\n",
        );
        let plan = super::plan(&current, &guards_only);
        assert_eq!(plan.needs_restart, ["bot.handlers", "bot.variants"]);
    }

    #[test]
    fn a_variants_model_changes_live_only_among_the_encoders_running() {
        let companion =
            "[inference]\ncompanion_model = \"c.onnx\"\ncompanion_tokenizer = \"c.json\"\n";
        let variants = |model: &str| {
            format!(
                "{companion}[[bot.variants]]\nname = \"a\"\nweight = 1\n\
                 [[bot.variants]]\nname = \"b\"\nweight = 1\nmodel = \"{model}\"\n"
            )
        };
        let current = config(&variants("primary"));
        let switched = config(&variants("companion"));
        let plan = plan(&current, &switched);
        assert_eq!(plan.applied, ["bot.variants"]);
        assert_eq!(
            plan.config.bot.variants[1].model,
            Some(VariantModel::Companion)
        );
        // A node started without a companion cannot switch a variant to it by a reload.
        let plan = super::plan(&config(""), &switched);
        assert_eq!(
            plan.needs_restart,
            [
                "bot.variants",
                "inference.companion_model",
                "inference.companion_tokenizer"
            ]
        );
        assert!(plan.config.bot.variants.is_empty());
    }

    #[test]
    fn an_invalid_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchboard.toml");
        std::fs::write(&path, "[limits]\nvisitor_message_burst = 0\n").unwrap();
        let live = LiveConfig::new(Arc::new(config("")));
        match reload(Some(&path), None, &live) {
            Outcome::Refused(err) => {
                assert!(err.to_string().contains("visitor_message_burst"), "{err}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(live.generation(), 0);
        std::fs::write(&path, "[limits]\nvisitor_message_burst = 3\n").unwrap();
        assert!(matches!(
            reload(Some(&path), None, &live),
            Outcome::Loaded { ref applied, .. } if applied == &["limits.visitor_message_burst"]
        ));
        assert_eq!(live.generation(), 1);
        assert_eq!(live.current().limits.visitor_message_burst, 3);
    }
}
