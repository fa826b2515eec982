//! Binding keys to fields, each key written once.
//!
//! A section is declared with [`config_section!`]: every key is one line giving its field, its Rust
//! type and its [`Kind`], which says how the value is read from TOML (with its allowed range), how
//! it is printed back and what it holds before the embedded default sets it. From that one line
//! the macro derives the struct field, the loader's match arm, the printer's line and the blank
//! value. [`config_sections!`] does the same one level up: it declares [`Config`] from the list
//! of sections.
//!
//! Invariants:
//! - The printer writes keys in declaration order, and that printed list is the list of valid keys
//!   (see `builder::known_keys`), so a key the loader accepts is always printed and vice versa.
//! - Each kind writes its value in a syntax its own reader accepts with the same result.

use super::*;

/// How the value of one key is read, printed back, and what it holds before the embedded
/// default is applied (the default sets every key, so a blank value is never seen).
pub(super) trait Kind<T> {
    fn read(&self, f: &Field<'_>) -> Result<T, ConfigError>;
    fn write(&self, w: &mut TomlWriter, key: &str, value: &T);
    fn blank(&self) -> T;
}

/// An integer in `min..=max`.
pub(super) struct Int(pub(super) i64, pub(super) i64);

impl<T: TryFrom<i64> + fmt::Display + Default> Kind<T> for Int {
    fn read(&self, f: &Field<'_>) -> Result<T, ConfigError> {
        f.integer_in(self.0, self.1)
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &T) {
        w.display(key, value);
    }
    fn blank(&self) -> T {
        T::default()
    }
}

/// A size in bytes in `min..=max`: an integer, or a string with a binary unit ("16KiB").
pub(super) struct Size(pub(super) u64, pub(super) u64);

impl<T: TryFrom<u64> + Copy + Default> Kind<T> for Size
where
    u64: TryFrom<T>,
{
    fn read(&self, f: &Field<'_>) -> Result<T, ConfigError> {
        f.size_in(self.0, self.1)
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &T) {
        w.size(key, u64::try_from(*value).unwrap_or(u64::MAX));
    }
    fn blank(&self) -> T {
        T::default()
    }
}

/// An LMDB map size: a [`Size`] in 1MiB..=1TiB that is a multiple of 4KiB.
pub(super) struct MapSize;

impl Kind<u64> for MapSize {
    fn read(&self, f: &Field<'_>) -> Result<u64, ConfigError> {
        let bytes: u64 = f.size_in(MIB, TIB)?;
        if !bytes.is_multiple_of(MAP_SIZE_GRANULE) {
            return Err(f.error(format_args!(
                "must be a multiple of 4KiB (4096 bytes), got {}",
                f.written()
            )));
        }
        Ok(bytes)
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &u64) {
        w.size(key, *value);
    }
    fn blank(&self) -> u64 {
        0
    }
}

/// A duration string in `min..=max` ("250ms").
pub(super) struct Dur(pub(super) Duration, pub(super) Duration);

impl Kind<Duration> for Dur {
    fn read(&self, f: &Field<'_>) -> Result<Duration, ConfigError> {
        f.duration_in(self.0, self.1)
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &Duration) {
        w.duration(key, *value);
    }
    fn blank(&self) -> Duration {
        Duration::ZERO
    }
}

/// A number (integer or float) in `min..=max`.
pub(super) struct Float(pub(super) f64, pub(super) f64);

impl Kind<f64> for Float {
    fn read(&self, f: &Field<'_>) -> Result<f64, ConfigError> {
        f.float_in(self.0, self.1)
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &f64) {
        w.float(key, *value);
    }
    fn blank(&self) -> f64 {
        0.0
    }
}

/// `true` or `false`.
pub(super) struct Bool;

impl Kind<bool> for Bool {
    fn read(&self, f: &Field<'_>) -> Result<bool, ConfigError> {
        f.boolean()
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &bool) {
        w.display(key, value);
    }
    fn blank(&self) -> bool {
        false
    }
}

/// A string of `min..=max` characters without control characters.
pub(super) struct Text(pub(super) usize, pub(super) usize);

impl Kind<String> for Text {
    fn read(&self, f: &Field<'_>) -> Result<String, ConfigError> {
        f.text(self.0, self.1).map(str::to_owned)
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &String) {
        w.string(key, value);
    }
    fn blank(&self) -> String {
        String::new()
    }
}

/// An array of strings, each of `min..=max` characters.
pub(super) struct Strings(pub(super) usize, pub(super) usize);

impl Kind<Vec<String>> for Strings {
    fn read(&self, f: &Field<'_>) -> Result<Vec<String>, ConfigError> {
        f.strings(self.0, self.1)
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &Vec<String>) {
        w.strings(key, value.iter().map(String::as_str));
    }
    fn blank(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A tracing level or directive list such as `info,switchboard::storage=debug`.
pub(super) struct LogDirectives;

impl Kind<String> for LogDirectives {
    fn read(&self, f: &Field<'_>) -> Result<String, ConfigError> {
        let level = f.string()?;
        check_log_directives(level).map_err(|reason| f.error(reason))?;
        Ok(level.to_owned())
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &String) {
        w.string(key, value);
    }
    fn blank(&self) -> String {
        String::new()
    }
}

/// A path that must be given (1 to 4096 characters).
pub(super) struct FilePath;

impl Kind<PathBuf> for FilePath {
    fn read(&self, f: &Field<'_>) -> Result<PathBuf, ConfigError> {
        f.path()
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &PathBuf) {
        w.path(key, value);
    }
    fn blank(&self) -> PathBuf {
        PathBuf::new()
    }
}

/// A path or `""` for none: an empty `PathBuf`, or `None` as an `Option<PathBuf>`.
pub(super) struct OptionalPath;

impl Kind<PathBuf> for OptionalPath {
    fn read(&self, f: &Field<'_>) -> Result<PathBuf, ConfigError> {
        f.optional_path()
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &PathBuf) {
        w.path(key, value);
    }
    fn blank(&self) -> PathBuf {
        PathBuf::new()
    }
}

impl Kind<Option<PathBuf>> for OptionalPath {
    fn read(&self, f: &Field<'_>) -> Result<Option<PathBuf>, ConfigError> {
        let path = f.optional_path()?;
        Ok((!path.as_os_str().is_empty()).then_some(path))
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &Option<PathBuf>) {
        w.path(key, value.as_deref().unwrap_or(Path::new("")));
    }
    fn blank(&self) -> Option<PathBuf> {
        None
    }
}

/// A socket address "IP:port".
pub(super) struct Address;

impl Kind<SocketAddr> for Address {
    fn read(&self, f: &Field<'_>) -> Result<SocketAddr, ConfigError> {
        f.socket_addr()
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &SocketAddr) {
        w.string(key, &value.to_string());
    }
    fn blank(&self) -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }
}

/// A socket address, or `""` for a listener that is switched off.
pub(super) struct OptionalAddress;

impl Kind<Option<SocketAddr>> for OptionalAddress {
    fn read(&self, f: &Field<'_>) -> Result<Option<SocketAddr>, ConfigError> {
        f.optional_socket_addr()
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &Option<SocketAddr>) {
        w.string(key, &value.map(|addr| addr.to_string()).unwrap_or_default());
    }
    fn blank(&self) -> Option<SocketAddr> {
        None
    }
}

/// One of a fixed list of names, each standing for a value of `T`.
pub(super) struct Choice<T: 'static>(pub(super) &'static [(&'static str, T)]);

impl<T: Copy + PartialEq + 'static> Kind<T> for Choice<T> {
    fn read(&self, f: &Field<'_>) -> Result<T, ConfigError> {
        f.choice(self.0)
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &T) {
        w.string(key, name_of(self.0, *value));
    }
    fn blank(&self) -> T {
        self.0[0].1
    }
}

/// `shards.cores`: "all" or a list of distinct core ids.
pub(super) struct CoreList;

impl Kind<Cores> for CoreList {
    fn read(&self, f: &Field<'_>) -> Result<Cores, ConfigError> {
        f.cores()
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &Cores) {
        match value {
            Cores::All => w.string(key, "all"),
            Cores::List(ids) => {
                let ids: Vec<String> = ids.iter().map(usize::to_string).collect();
                w.raw(key, &format!("[{}]", ids.join(", ")));
            }
        }
    }
    fn blank(&self) -> Cores {
        Cores::All
    }
}

/// `bot.handlers`: a non-empty list of distinct handler names.
pub(super) struct HandlerList;

impl Kind<Vec<BotHandler>> for HandlerList {
    fn read(&self, f: &Field<'_>) -> Result<Vec<BotHandler>, ConfigError> {
        f.handlers()
    }
    fn write(&self, w: &mut TomlWriter, key: &str, value: &Vec<BotHandler>) {
        w.strings(key, value.iter().map(|h| h.as_str()));
    }
    fn blank(&self) -> Vec<BotHandler> {
        Vec::new()
    }
}

/// Declares one section: its struct, and from each key's one line the loader's match arm, the
/// printer's line and the blank value.
///
/// ```text
/// config_section! {
///     /// `[server]`
///     pub struct ServerConfig {
///         pub listen: SocketAddr = Address,
///         pub backlog: u32 = Int(1, 65_535),
///     }
///     // optional: fields read and printed by hand (sub-tables such as `agents.accounts`),
///     // printed by the named method after the section's keys
///     tables(write_accounts) { pub accounts: BTreeMap<String, AgentAccount>, }
/// }
/// ```
macro_rules! config_section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident : $ty:ty = $kind:expr,
            )*
        }
        $(
            tables($write_tables:ident) {
                $( $(#[$table_meta:meta])* pub $table:ident : $table_ty:ty, )*
            }
        )?
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
            $($( $(#[$table_meta])* pub $table: $table_ty, )*)?
        }

        impl $name {
            /// Sets `key` from `f`; `Ok(false)` for a key this section does not have.
            fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
                $(
                    if key == stringify!($field) {
                        self.$field = Kind::<$ty>::read(&$kind, f)?;
                        return Ok(true);
                    }
                )*
                Ok(false)
            }

            /// Prints every key, then the section's sub-tables.
            fn write(&self, w: &mut TomlWriter) {
                $( Kind::<$ty>::write(&$kind, w, stringify!($field), &self.$field); )*
                $( self.$write_tables(w); )?
            }

            /// Placeholder values, all overwritten by the embedded default.
            fn blank() -> Self {
                $name {
                    $( $field: Kind::<$ty>::blank(&$kind), )*
                    $($( $table: Default::default(), )*)?
                }
            }
        }
    };
}

/// Declares [`Config`] from its sections, with the dispatch of a section's keys, the printer and
/// the blank configuration.
macro_rules! config_sections {
    ( $( $section:ident : $ty:ident, )* ) => {
        /// The effective configuration: embedded defaults with the optional `--config` file laid
        /// over them. Field meanings, units and ranges are documented in `tuning/default.toml`.
        #[derive(Clone, Debug, PartialEq)]
        pub struct Config {
            $( pub $section: $ty, )*
            /// Where each key was last set; used to point errors found after loading at the
            /// right line.
            origins: Origins,
        }

        impl Config {
            /// Sets `section.key` from `f`; `Ok(false)` when there is no such key.
            fn set(&mut self, section: &str, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
                match section {
                    $( stringify!($section) => self.$section.set(key, f), )*
                    _ => Ok(false),
                }
            }

            /// Prints every section in declaration order.
            fn write_toml(&self, w: &mut TomlWriter) {
                $(
                    w.section(stringify!($section));
                    self.$section.write(w);
                )*
            }

            /// Placeholder values the embedded default overwrites entirely (it must set every key).
            fn blank() -> Config {
                Config {
                    $( $section: $ty::blank(), )*
                    origins: Origins::default(),
                }
            }
        }
    };
}

pub(super) use {config_section, config_sections};
