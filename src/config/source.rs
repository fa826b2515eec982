//! One parsed TOML layer ([`Source`]) and one value in it ([`Field`]), with its dotted key and
//! line, and typed readers whose errors name both.

use super::*;

/// One parsed layer: the embedded default (layer 0) or an overlay file.
pub(super) struct Source<'t> {
    pub(super) name: &'t str,
    pub(super) text: &'t str,
    pub(super) layer: usize,
    pub(super) doc: ImDocument<&'t str>,
}

impl<'t> Source<'t> {
    pub(super) fn parse(name: &'t str, text: &'t str, layer: usize) -> Result<Self, ConfigError> {
        let doc = ImDocument::parse(text).map_err(|error| ConfigError::Syntax {
            file: name.to_owned(),
            line: error.span().map_or(1, |span| line_at(text, span.start)),
            message: one_line(error.message()),
        })?;
        Ok(Source {
            name,
            text,
            layer,
            doc,
        })
    }

    /// The value as written, on one line and shortened, for messages.
    pub(super) fn snippet(&self, value: &Value) -> String {
        let written = match value.span().and_then(|span| self.text.get(span)) {
            Some(text) => text.trim().to_owned(),
            None => value.to_string().trim().to_owned(),
        };
        let first_line = written.lines().next().unwrap_or("");
        let mut shown: String = first_line.chars().take(60).collect();
        if shown.len() < written.len() {
            shown.push('…');
        }
        shown
    }
}

pub(super) fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub(super) fn one_line(message: &str) -> String {
    let parts: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    parts.join("; ")
}

#[derive(Clone, Copy)]
pub(super) enum Node<'a> {
    Item(&'a Item),
    /// An element of an array.
    Element(&'a Value),
    /// A table of an array of tables (`[[section.key]]`).
    Table(&'a toml_edit::Table),
}

pub(super) struct Field<'a> {
    pub(super) src: &'a Source<'a>,
    pub(super) key: String,
    pub(super) line: usize,
    pub(super) node: Node<'a>,
    /// Index within its array, for array elements.
    pub(super) element: Option<usize>,
}

impl<'a> Field<'a> {
    pub(super) fn root(src: &'a Source<'a>) -> Self {
        Field {
            src,
            key: String::new(),
            line: 1,
            node: Node::Item(src.doc.as_item()),
            element: None,
        }
    }

    pub(super) fn child(&self, table: &'a dyn TableLike, name: &str, item: &'a Item) -> Field<'a> {
        let span = table
            .key(name)
            .and_then(|k| k.span())
            .or_else(|| item.span());
        let line = span.map_or(self.line, |span| line_at(self.src.text, span.start));
        let key = if self.key.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.key)
        };
        Field {
            src: self.src,
            key,
            line,
            node: Node::Item(item),
            element: None,
        }
    }

    pub(super) fn error(&self, message: impl fmt::Display) -> ConfigError {
        let message = match self.element {
            Some(index) => format!("element {}: {message}", index + 1),
            None => message.to_string(),
        };
        ConfigError::Invalid {
            file: self.src.name.to_owned(),
            line: self.line,
            key: self.key.clone(),
            message,
        }
    }

    pub(super) fn wrong_type(&self, expected: &str) -> ConfigError {
        self.error(format_args!("expected {expected}, got {}", self.describe()))
    }

    /// Type and text of the value, e.g. `integer 10`, `string "abc"`, `a table`.
    pub(super) fn describe(&self) -> String {
        let value = match self.node {
            Node::Item(Item::Value(value)) | Node::Element(value) => value,
            Node::Item(Item::Table(_)) | Node::Table(_) => return "a table".to_owned(),
            Node::Item(Item::ArrayOfTables(_)) => return "an array of tables".to_owned(),
            Node::Item(Item::None) => return "nothing".to_owned(),
        };
        let kind = match value {
            Value::String(_) => "string",
            Value::Integer(_) => "integer",
            Value::Float(_) => "float",
            Value::Boolean(_) => "boolean",
            Value::Datetime(_) => "datetime",
            Value::Array(_) => "array",
            Value::InlineTable(_) => "inline table",
        };
        format!("{kind} {}", self.src.snippet(value))
    }

    /// The value as written in the file, for "got ..." in messages.
    pub(super) fn written(&self) -> String {
        match self.value() {
            Some(value) => self.src.snippet(value),
            None => self.describe(),
        }
    }

    pub(super) fn value(&self) -> Option<&'a Value> {
        match self.node {
            Node::Item(item) => item.as_value(),
            Node::Element(value) => Some(value),
            Node::Table(_) => None,
        }
    }

    pub(super) fn table(&self, expected: &str) -> Result<&'a dyn TableLike, ConfigError> {
        let table = match self.node {
            Node::Item(item) => item.as_table_like(),
            Node::Element(value) => value.as_inline_table().map(|t| t as &dyn TableLike),
            Node::Table(table) => Some(table as &dyn TableLike),
        };
        table.ok_or_else(|| self.wrong_type(expected))
    }

    pub(super) fn elements(&self, expected: &str) -> Result<Vec<Field<'a>>, ConfigError> {
        let array = self
            .value()
            .and_then(Value::as_array)
            .ok_or_else(|| self.wrong_type(expected))?;
        Ok(array
            .iter()
            .enumerate()
            .map(|(index, value)| Field {
                src: self.src,
                key: self.key.clone(),
                line: value
                    .span()
                    .map_or(self.line, |span| line_at(self.src.text, span.start)),
                node: Node::Element(value),
                element: Some(index),
            })
            .collect())
    }

    /// The tables of an array of tables (`[[key]]` sections, or an array of inline tables), each
    /// named `key[N]` (1-based) in messages.
    pub(super) fn array_tables(&self, expected: &str) -> Result<Vec<Field<'a>>, ConfigError> {
        if let Node::Item(Item::ArrayOfTables(array)) = self.node {
            return Ok(array
                .iter()
                .enumerate()
                .map(|(index, table)| Field {
                    src: self.src,
                    key: format!("{}[{}]", self.key, index + 1),
                    line: table
                        .span()
                        .map_or(self.line, |span| line_at(self.src.text, span.start)),
                    node: Node::Table(table),
                    element: None,
                })
                .collect());
        }
        Ok(self
            .elements(expected)?
            .into_iter()
            .enumerate()
            .map(|(index, mut element)| {
                element.key = format!("{}[{}]", self.key, index + 1);
                element.element = None;
                element
            })
            .collect())
    }

    pub(super) fn boolean(&self) -> Result<bool, ConfigError> {
        self.value()
            .and_then(Value::as_bool)
            .ok_or_else(|| self.wrong_type("true or false"))
    }

    pub(super) fn string(&self) -> Result<&'a str, ConfigError> {
        self.value()
            .and_then(Value::as_str)
            .ok_or_else(|| self.wrong_type("a string"))
    }

    /// A string of `min..=max` characters without control characters.
    pub(super) fn text(&self, min: usize, max: usize) -> Result<&'a str, ConfigError> {
        let text = self.string()?;
        let chars = text.chars().count();
        if chars < min || chars > max {
            return Err(self.error(format_args!(
                "must be {min} to {max} characters long, got {chars}"
            )));
        }
        if text.chars().any(char::is_control) {
            return Err(self.error("must not contain control characters"));
        }
        Ok(text)
    }

    pub(super) fn path(&self) -> Result<PathBuf, ConfigError> {
        Ok(PathBuf::from(self.text(1, 4096)?))
    }

    /// A path, or `""` for none (an empty `PathBuf`).
    pub(super) fn optional_path(&self) -> Result<PathBuf, ConfigError> {
        Ok(PathBuf::from(self.text(0, 4096)?))
    }

    pub(super) fn integer_in<T: TryFrom<i64>>(&self, min: i64, max: i64) -> Result<T, ConfigError> {
        let n = self
            .value()
            .and_then(Value::as_integer)
            .ok_or_else(|| self.wrong_type("an integer"))?;
        if !(min..=max).contains(&n) {
            return Err(self.error(format_args!(
                "must be between {min} and {max}, got {}",
                self.written()
            )));
        }
        T::try_from(n).map_err(|_| self.error("does not fit this platform's integer size"))
    }

    pub(super) fn float_in(&self, min: f64, max: f64) -> Result<f64, ConfigError> {
        let x = match self.value() {
            Some(Value::Float(f)) => *f.value(),
            Some(Value::Integer(i)) => *i.value() as f64,
            _ => return Err(self.wrong_type("a number")),
        };
        if !(min..=max).contains(&x) {
            return Err(self.error(format_args!(
                "must be between {min:?} and {max:?}, got {}",
                self.written()
            )));
        }
        Ok(x)
    }

    pub(super) fn duration_in(
        &self,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        let text = match self.value() {
            Some(Value::String(s)) => s.value().as_str(),
            Some(Value::Integer(_)) | Some(Value::Float(_)) => return Err(self.wrong_type(
                "a duration string such as \"250ms\" or \"5s\" (bare numbers are not accepted: \
                     the unit would be a guess)",
            )),
            _ => return Err(self.wrong_type("a duration string such as \"250ms\" or \"5s\"")),
        };
        let duration = parse_duration(text).map_err(|reason| self.error(reason))?;
        if duration < min || duration > max {
            return Err(self.error(format_args!(
                "must be between {} and {}, got {}",
                format_duration(min),
                format_duration(max),
                self.written()
            )));
        }
        Ok(duration)
    }

    /// Bounds are shown in the style the value was written in: bytes for integers, units for strings.
    pub(super) fn size_in<T: TryFrom<u64>>(&self, min: u64, max: u64) -> Result<T, ConfigError> {
        let (bytes, as_string) = match self.value() {
            Some(Value::Integer(i)) => (u64::try_from(*i.value()).ok(), false),
            Some(Value::String(s)) => (
                Some(parse_size(s.value()).map_err(|reason| self.error(reason))?),
                true,
            ),
            _ => {
                return Err(
                    self.wrong_type("a size: bytes as an integer, or a string such as \"16KiB\"")
                )
            }
        };
        match bytes {
            Some(bytes) if (min..=max).contains(&bytes) => T::try_from(bytes)
                .map_err(|_| self.error("does not fit this platform's integer size")),
            _ => {
                let shown = |n: u64| {
                    if as_string {
                        format_size(n)
                    } else {
                        n.to_string()
                    }
                };
                Err(self.error(format_args!(
                    "must be between {} and {}, got {}",
                    shown(min),
                    shown(max),
                    self.written()
                )))
            }
        }
    }

    /// An address, or `None` for an empty string (a listener that is switched off).
    pub(super) fn optional_socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.string()?.is_empty() {
            Ok(None)
        } else {
            self.socket_addr().map(Some)
        }
    }

    pub(super) fn socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        let expected = "an address \"IP:port\" such as \"127.0.0.1:8080\" or \"[::1]:8080\"";
        let text = self
            .value()
            .and_then(Value::as_str)
            .ok_or_else(|| self.wrong_type(expected))?;
        text.parse().map_err(|_| {
            self.error(format_args!(
                "expected {expected} (host names are not resolved), got {}",
                self.written()
            ))
        })
    }

    pub(super) fn choice<T: Copy>(&self, choices: &[(&'static str, T)]) -> Result<T, ConfigError> {
        let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let names = names.join(", ");
        let text = self
            .value()
            .and_then(Value::as_str)
            .ok_or_else(|| self.wrong_type(&format!("one of {names}")))?;
        choices
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, value)| *value)
            .ok_or_else(|| {
                self.error(format_args!(
                    "must be one of {names}, got {}",
                    self.written()
                ))
            })
    }

    /// An array of strings, each `min_len..=max_len` characters.
    pub(super) fn strings(
        &self,
        min_len: usize,
        max_len: usize,
    ) -> Result<Vec<String>, ConfigError> {
        self.elements("an array of strings")?
            .iter()
            .map(|element| element.text(min_len, max_len).map(str::to_owned))
            .collect()
    }

    pub(super) fn cores(&self) -> Result<Cores, ConfigError> {
        let expected = "\"all\" or a list of core ids such as [0, 1]";
        match self.value() {
            Some(Value::String(s)) if s.value() == "all" => return Ok(Cores::All),
            Some(Value::Array(_)) => {}
            _ => return Err(self.wrong_type(expected)),
        }
        let mut ids: Vec<usize> = Vec::new();
        for element in self.elements(expected)? {
            let id: usize = element.integer_in(0, MAX_CORE_ID)?;
            if ids.contains(&id) {
                return Err(element.error(format_args!("core {id} is listed twice")));
            }
            ids.push(id);
        }
        if ids.is_empty() {
            return Err(self.error("must list at least one core id, or be \"all\""));
        }
        Ok(Cores::List(ids))
    }

    pub(super) fn handlers(&self) -> Result<Vec<BotHandler>, ConfigError> {
        let mut handlers = Vec::new();
        for element in self.elements("an array of handler names")? {
            let handler = element.choice(&BotHandler::choices())?;
            if handlers.contains(&handler) {
                return Err(element.error(format_args!(
                    "handler \"{}\" is listed twice",
                    handler.as_str()
                )));
            }
            handlers.push(handler);
        }
        if handlers.is_empty() {
            return Err(self.error("must list at least one handler"));
        }
        Ok(handlers)
    }

    pub(super) fn token(&self) -> Result<String, ConfigError> {
        let token = self.string()?;
        let length = token.chars().count();
        if !(16..=256).contains(&length) {
            return Err(self.error(format_args!(
                "must be 16 to 256 characters long, got {length}"
            )));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.error("must be printable ASCII without spaces"));
        }
        Ok(token.to_owned())
    }

    pub(super) fn display_name(&self) -> Result<String, ConfigError> {
        self.text(1, 128).map(str::to_owned)
    }
}
