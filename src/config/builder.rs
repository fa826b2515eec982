//! Loading: parse each layer (the embedded default, then the overlay), apply it key by key through
//! the sections' bindings, then check the rules that span several keys.
//!
//! Invariants: the embedded default sets every key; each key's origin (file, line, layer) is
//! recorded so that errors found after loading point at the line that set the value; a rule
//! broken by two keys blames the one set later.

use super::*;

/// Every known dotted key, sections included (e.g. `server`, `server.listen`, `agents.accounts`).
pub(super) fn known_keys() -> Vec<String> {
    let mut writer = TomlWriter::default();
    Config::blank().write_toml(&mut writer);
    writer.keys
}

/// The valid keys directly under `parent` ("" for the top level), for "unknown key" messages.
pub(super) fn valid_children(parent: &str) -> String {
    let children: Vec<String> = known_keys()
        .into_iter()
        .filter_map(|key| {
            let rest = if parent.is_empty() {
                Some(key.as_str())
            } else {
                key.strip_prefix(parent).and_then(|r| r.strip_prefix('.'))
            }?;
            (!rest.contains('.')).then(|| rest.to_owned())
        })
        .collect();
    children.join(", ")
}

// ---------------------------------------------------------------------------------------------------
// Loading: parse each layer, apply it key by key, then check rules spanning several keys.
// ---------------------------------------------------------------------------------------------------

pub(super) fn load_layers(
    default_text: &str,
    overlays: &[(&str, &str)],
) -> Result<Config, ConfigError> {
    let mut builder = Builder::new();
    let default = Source::parse(EMBEDDED_DEFAULT_NAME, default_text, 0)?;
    builder.apply(&default)?;
    builder.require_complete()?;
    for (index, (name, text)) in overlays.iter().enumerate() {
        let source = Source::parse(name, text, index + 1)?;
        builder.apply(&source)?;
    }
    builder.finish()
}

/// Where each dotted key (and each section) got its effective value.
#[derive(Clone, Default)]
pub(super) struct Origins(HashMap<String, Origin>);

#[derive(Clone, Debug)]
pub(super) struct Origin {
    pub(super) file: String,
    pub(super) line: usize,
    pub(super) layer: usize,
}

/// Origins say where values came from, not what they are: configs with equal values are equal.
impl PartialEq for Origins {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for Origins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Origins { .. }")
    }
}

impl Origins {
    pub(super) fn record(&mut self, field: &Field<'_>) {
        self.0.insert(
            field.key.clone(),
            Origin {
                file: field.src.name.to_owned(),
                line: field.line,
                layer: field.src.layer,
            },
        );
    }

    /// The origin of `key`, or of its nearest recorded parent (an optional key that was never set
    /// is located at its table).
    pub(super) fn find(&self, key: &str) -> Option<&Origin> {
        let mut key = key;
        loop {
            if let Some(origin) = self.0.get(key) {
                return Some(origin);
            }
            key = &key[..key.rfind('.')?];
        }
    }

    /// (layer, line): larger means set later, i.e. by the overlay rather than the default.
    pub(super) fn rank(&self, key: &str) -> (usize, usize) {
        self.find(key).map_or((0, 0), |o| (o.layer, o.line))
    }

    pub(super) fn error_at(&self, key: &str, message: impl fmt::Display) -> ConfigError {
        let (file, line) = match self.find(key) {
            Some(origin) => (origin.file.clone(), origin.line),
            None => (EMBEDDED_DEFAULT_NAME.to_owned(), 1),
        };
        ConfigError::Invalid {
            file,
            line,
            key: key.to_owned(),
            message: message.to_string(),
        }
    }
}

/// An agent account as merged so far; optional keys are filled in by `Builder::finish`.
#[derive(Default)]
pub(super) struct PartialAccount {
    pub(super) token: Option<String>,
    pub(super) name: Option<String>,
    pub(super) max_open: Option<u32>,
}

pub(super) struct Builder {
    pub(super) config: Config,
    pub(super) accounts: BTreeMap<String, PartialAccount>,
    pub(super) origins: Origins,
}

impl Builder {
    pub(super) fn new() -> Self {
        Builder {
            config: Config::blank(),
            accounts: BTreeMap::new(),
            origins: Origins::default(),
        }
    }

    pub(super) fn apply(&mut self, source: &Source<'_>) -> Result<(), ConfigError> {
        let root = Field::root(source);
        let top: &dyn TableLike = source.doc.as_table();
        for (name, item) in top.iter() {
            let section = root.child(top, name, item);
            if !known_keys().iter().any(|k| k == name) {
                return Err(section.error(format_args!(
                    "unknown section; valid sections are: {}",
                    valid_children("")
                )));
            }
            let entries = section.table("a table")?;
            self.origins.record(&section);
            for (key, item) in entries.iter() {
                let field = section.child(entries, key, item);
                if !self.set(name, key, &field)? {
                    return Err(field.error(format_args!(
                        "unknown key; valid keys in [{name}] are: {}",
                        valid_children(name)
                    )));
                }
                self.origins.record(&field);
            }
        }
        Ok(())
    }

    fn set(&mut self, section: &str, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match (section, key) {
            ("agents", "accounts") => self.apply_accounts(f).map(|()| true),
            ("visitors", "sites") => self.apply_sites(f).map(|()| true),
            ("bot", "variants") => self.apply_variants(f).map(|()| true),
            _ => self.config.set(section, key, f),
        }
    }

    pub(super) fn apply_accounts(&mut self, accounts: &Field<'_>) -> Result<(), ConfigError> {
        let table = accounts.table("a table of agent accounts")?;
        for (id, item) in table.iter() {
            let account = accounts.child(table, id, item);
            check_account_id(id).map_err(|reason| account.error(reason))?;
            let entries = account.table("a table with token, name and max_open")?;
            self.origins.record(&account);
            let partial = self.accounts.entry(id.to_owned()).or_default();
            for (key, item) in entries.iter() {
                let field = account.child(entries, key, item);
                match key {
                    "token" => partial.token = Some(field.token()?),
                    "name" => partial.name = Some(field.display_name()?),
                    "max_open" => partial.max_open = Some(field.integer_in(1, 1000)?),
                    _ => return Err(field.error(
                        "unknown key in an agent account; valid keys are: token, name, max_open",
                    )),
                }
                self.origins.record(&field);
            }
        }
        Ok(())
    }

    pub(super) fn apply_sites(&mut self, sites: &Field<'_>) -> Result<(), ConfigError> {
        let table = sites.table("a table of sites")?;
        for (name, item) in table.iter() {
            let site = sites.child(table, name, item);
            if !valid_site_name(name) {
                return Err(site.error(format_args!(
                    "invalid site name \"{name}\": use 1 to 128 characters of A-Z a-z 0-9 . _ -"
                )));
            }
            let entries = site.table("a table with origins, identity_key or identity_key_file")?;
            self.origins.record(&site);
            let config = self
                .config
                .visitors
                .sites
                .entry(name.to_owned())
                .or_insert(SiteConfig {
                    origins: Vec::new(),
                    identity_key_source: None,
                    identity_key: None,
                });
            for (key, item) in entries.iter() {
                let field = site.child(entries, key, item);
                match key {
                    "origins" => {
                        let origins = field.strings(1, 512)?;
                        for origin in &origins {
                            check_origin(origin).map_err(|reason| field.error(reason))?;
                        }
                        config.origins = origins;
                    }
                    "identity_key" => {
                        let key = field.string()?;
                        if key.len() < 32 {
                            return Err(field.error(format_args!(
                                "must be at least 32 bytes of random text, got {}",
                                key.len()
                            )));
                        }
                        config.identity_key = Some(key.as_bytes().to_vec());
                        config.identity_key_source = Some(IdentityKeySource::Inline(key.to_owned()));
                    }
                    "identity_key_file" => {
                        let path = field.path()?;
                        let bytes = std::fs::read(&path).map_err(|err| {
                            field.error(format_args!("cannot read {}: {err}", path.display()))
                        })?;
                        let key = trim_line_break(&bytes);
                        if key.len() < 32 {
                            return Err(field.error(format_args!(
                                "{} holds {} bytes; an identity key needs at least 32",
                                path.display(),
                                key.len()
                            )));
                        }
                        config.identity_key = Some(key.to_vec());
                        config.identity_key_source = Some(IdentityKeySource::File(path));
                    }
                    _ => {
                        return Err(field.error(
                            "unknown key in a site; valid keys are: origins, identity_key, identity_key_file",
                        ))
                    }
                }
                self.origins.record(&field);
            }
        }
        Ok(())
    }

    /// `[[bot.variants]]`: the whole list, replacing the one set by an earlier layer.
    pub(super) fn apply_variants(&mut self, variants: &Field<'_>) -> Result<(), ConfigError> {
        const KEYS: &str = "name, weight, handlers, confidence_threshold, margin_threshold, model";
        let mut parsed: Vec<BotVariant> = Vec::new();
        for variant in variants.array_tables("an array of tables ([[bot.variants]] sections)")? {
            let entries = variant.table(&format!("a table with {KEYS}"))?;
            self.origins.record(&variant);
            let mut name: Option<String> = None;
            let mut weight: Option<f64> = None;
            let mut handlers = None;
            let mut confidence_threshold = None;
            let mut margin_threshold = None;
            let mut model = None;
            for (key, item) in entries.iter() {
                let field = variant.child(entries, key, item);
                match key {
                    "name" => {
                        let text = field.text(1, 64)?;
                        if !text
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                        {
                            return Err(field.error(format_args!(
                                "invalid variant name \"{text}\": use 1 to 64 characters of \
                                 A-Z a-z 0-9 _ -"
                            )));
                        }
                        if parsed.iter().any(|other| other.name == text) {
                            return Err(field.error(format_args!(
                                "variant \"{text}\" is listed twice; every variant needs its own name"
                            )));
                        }
                        name = Some(text.to_owned());
                    }
                    "weight" => weight = Some(field.float_in(0.0, 1e6)?),
                    "handlers" => {
                        let list = field.handlers()?;
                        if list.contains(&BotHandler::RiskControl) {
                            return Err(field.error(
                                "\"risk_control\" cannot be a variant's handler: it guards every \
                                 message before it is stored, whatever the variant; list it in \
                                 [bot] handlers",
                            ));
                        }
                        handlers = Some(list);
                    }
                    "confidence_threshold" => {
                        confidence_threshold = Some(field.float_in(0.0, 1.0)?)
                    }
                    "margin_threshold" => margin_threshold = Some(field.float_in(0.0, 1.0)?),
                    "model" => {
                        let text = field.text(1, 64)?;
                        model = Some(VariantModel::parse(text).ok_or_else(|| {
                            field.error(format_args!(
                                "unknown model \"{text}\": a variant's model must be one of \
                                 \"{}\" ([inference] model alone) or \"{}\" ([inference] model \
                                 and companion_model on every question), or left out (the \
                                 cascade as [inference] says); a variant can only choose among \
                                 the encoders the node loads, because the knowledge base holds \
                                 vectors for those only",
                                VariantModel::NAMES[0],
                                VariantModel::NAMES[1]
                            ))
                        })?);
                    }
                    _ => {
                        return Err(field.error(format_args!(
                            "unknown key in a variant; valid keys are: {KEYS}"
                        )))
                    }
                }
                self.origins.record(&field);
            }
            let name =
                name.ok_or_else(|| variant.error("every variant needs a name (name = \"...\")"))?;
            let weight = weight.ok_or_else(|| {
                variant.error(format_args!(
                    "variant \"{name}\" needs a weight (its share of new conversations)"
                ))
            })?;
            parsed.push(BotVariant {
                name,
                weight,
                handlers,
                confidence_threshold,
                margin_threshold,
                model,
            });
        }
        if parsed.len() > MAX_VARIANTS {
            return Err(variants.error(format_args!(
                "at most {MAX_VARIANTS} variants, got {}",
                parsed.len()
            )));
        }
        if !parsed.is_empty() && parsed.iter().all(|variant| variant.weight == 0.0) {
            return Err(variants.error(
                "at least one variant needs a weight above 0, or no conversation has a variant",
            ));
        }
        self.config.bot.variants = parsed;
        Ok(())
    }

    /// The embedded default must set every key (so it documents every key).
    pub(super) fn require_complete(&self) -> Result<(), ConfigError> {
        match known_keys()
            .into_iter()
            .find(|key| !self.origins.0.contains_key(key))
        {
            Some(key) => Err(ConfigError::Incomplete {
                file: EMBEDDED_DEFAULT_NAME.to_owned(),
                key,
            }),
            None => Ok(()),
        }
    }

    pub(super) fn finish(mut self) -> Result<Config, ConfigError> {
        self.finish_accounts()?;
        self.check_cross_field_rules()?;
        self.config.origins = self.origins;
        Ok(self.config)
    }

    pub(super) fn finish_accounts(&mut self) -> Result<(), ConfigError> {
        let default_max_open = self.config.agents.default_max_open;
        let mut accounts = BTreeMap::new();
        for (id, partial) in std::mem::take(&mut self.accounts) {
            let token = partial.token.ok_or_else(|| {
                self.origins.error_at(
                    &format!("agents.accounts.{id}.token"),
                    "required: every agent account needs a token",
                )
            })?;
            let account = AgentAccount {
                token,
                name: partial.name.unwrap_or_else(|| id.clone()),
                max_open: partial.max_open.unwrap_or(default_max_open),
            };
            accounts.insert(id, account);
        }

        let mut owner_of_token: HashMap<&str, &str> = HashMap::new();
        for (id, account) in &accounts {
            if let Some(other) = owner_of_token.insert(&account.token, id) {
                let key = format!("agents.accounts.{id}.token");
                let other_key = format!("agents.accounts.{other}.token");
                let (blamed, partner) = if self.origins.rank(&key) >= self.origins.rank(&other_key)
                {
                    (id.as_str(), other)
                } else {
                    (other, id.as_str())
                };
                return Err(self.origins.error_at(
                    &format!("agents.accounts.{blamed}.token"),
                    format_args!(
                        "same token as agents.accounts.{partner}; every account needs its own token"
                    ),
                ));
            }
        }
        self.config.agents.accounts = accounts;
        Ok(())
    }

    pub(super) fn check_cross_field_rules(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        let d = format_duration;
        if c.tls.listen.is_some() {
            for (key, path) in [("tls.cert", &c.tls.cert), ("tls.key", &c.tls.key)] {
                if path.as_os_str().is_empty() {
                    return Err(self.origins.error_at(
                        key,
                        "required when tls.listen is set (`switchboard tls self-signed` writes a pair)",
                    ));
                }
            }
        }
        if let Some(metrics) = c.metrics.listen {
            let public = [Some(c.server.listen), c.tls.listen];
            if metrics.port() != 0 && public.contains(&Some(metrics)) {
                return Err(self.origins.error_at(
                    "metrics.listen",
                    "must differ from server.listen and tls.listen: the metrics listener is a \
                     separate socket, served without a token",
                ));
            }
        }
        let companion = &c.inference;
        if companion.companion_model.as_os_str().is_empty()
            != companion.companion_tokenizer.as_os_str().is_empty()
        {
            let key = if companion.companion_model.as_os_str().is_empty() {
                "inference.companion_model"
            } else {
                "inference.companion_tokenizer"
            };
            return Err(self.origins.error_at(
                key,
                "companion_model and companion_tokenizer are set together (both \"\" for none)",
            ));
        }
        for (index, variant) in c.bot.variants.iter().enumerate() {
            if variant.model == Some(VariantModel::Companion)
                && (!c.inference.enabled || c.inference.companion_model.as_os_str().is_empty())
            {
                return Err(self.origins.error_at(
                    &format!("bot.variants[{}].model", index + 1),
                    format_args!(
                        "variant \"{}\" asks for the companion model, but this node loads none: \
                         set [inference] companion_model and companion_tokenizer (with \
                         [inference] enabled = true) and re-import the knowledge base so it holds \
                         the companion's vectors, or use model = \"primary\"",
                        variant.name
                    ),
                ));
            }
        }
        self.ordered(
            ("websocket.ping_interval", d(c.websocket.ping_interval)),
            ("websocket.idle_timeout", d(c.websocket.idle_timeout)),
            c.websocket.ping_interval < c.websocket.idle_timeout,
            Strictness::Strict,
        )?;
        self.ordered(
            (
                "conversations.typing_interval",
                d(c.conversations.typing_interval),
            ),
            (
                "conversations.typing_expiry",
                d(c.conversations.typing_expiry),
            ),
            c.conversations.typing_interval < c.conversations.typing_expiry,
            Strictness::Strict,
        )?;
        self.ordered(
            ("storage.map_size", format_size(c.storage.map_size)),
            ("storage.max_map_size", format_size(c.storage.max_map_size)),
            c.storage.map_size <= c.storage.max_map_size,
            Strictness::OrEqual,
        )?;
        self.ordered(
            ("inference.batch_window", d(c.inference.batch_window)),
            ("inference.max_wait", d(c.inference.max_wait)),
            c.inference.batch_window < c.inference.max_wait,
            Strictness::Strict,
        )?;
        self.ordered(
            (
                "conversations.max_text_bytes",
                c.conversations.max_text_bytes.to_string(),
            ),
            (
                "websocket.max_message_bytes",
                c.websocket.max_message_bytes.to_string(),
            ),
            c.conversations.max_text_bytes <= c.websocket.max_message_bytes,
            Strictness::OrEqual,
        )
    }

    /// Checks `lower < upper` (or `<=`); on failure blames whichever key was set later, so the error
    /// points into the overlay that broke the rule rather than at the default it conflicts with.
    pub(super) fn ordered(
        &self,
        (lower, lower_shown): (&str, String),
        (upper, upper_shown): (&str, String),
        holds: bool,
        strictness: Strictness,
    ) -> Result<(), ConfigError> {
        if holds {
            return Ok(());
        }
        let (greater, smaller) = match strictness {
            Strictness::Strict => ("greater than", "less than"),
            Strictness::OrEqual => ("at least", "at most"),
        };
        Err(if self.origins.rank(upper) >= self.origins.rank(lower) {
            self.origins.error_at(
                upper,
                format_args!("must be {greater} {lower} ({lower_shown}), got {upper_shown}"),
            )
        } else {
            self.origins.error_at(
                lower,
                format_args!("must be {smaller} {upper} ({upper_shown}), got {lower_shown}"),
            )
        })
    }
}

#[derive(Clone, Copy)]
pub(super) enum Strictness {
    Strict,
    OrEqual,
}
