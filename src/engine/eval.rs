//! `switchboard kb eval`: accuracy, confusions, fallback rate and latency of the intent engine
//! on a labelled CSV (`text,category`), through the same path the server takes.
//!
//! Each query goes through [`IntentEngine::recognise`] (one at a time, each awaited before the
//! next, so a latency is one query's embed + classify through the inference worker) and then
//! through the `intent` bot handler ([`IntentAnswer`]) with the configured confidence and margin
//! thresholds: a reply is a prediction, anything else is a fallback. Accuracy is top-1 over all
//! rows, with a fallback counted as wrong.
//!
//! Invariants:
//! - The whole file is read and checked before any query runs, by the `kb import` parser:
//!   every problem is reported with its 1-based line.
//! - A category the knowledge base does not have can never be predicted; such rows count as
//!   wrong and are reported.
//! - A row labelled [`NO_INTENT`] (`(none)`) is an off-topic question: it is counted apart
//!   (`off_topic`, `off_topic_fell_back`; not in `queries`, accuracy or the threshold sweep) and
//!   is right when the bot falls back.
//! - Gray release ([`evaluate_variants`]): each `[[bot.variants]]` variant's whole answer chain
//!   (its handlers, its thresholds) runs on the same recognitions, so variants differ only by
//!   what their chains do with them; a variant with its own `model` runs on recognitions made
//!   again with that model setting (once per setting). A reply is right when it names the
//!   row's intent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::intent::{Cascade, IntentEngine, IntentResult};
use crate::bot::{BotContext, Chain, HandlerSpec, IntentAnswer, MessageHandler, Registry, Verdict};
use crate::config::{BotConfig, Config, VariantModel};
use crate::kb;

/// One labelled query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledQuery {
    pub text: String,
    pub category: String,
}

/// Reads labelled queries from a file in a format `kb import` takes: a CSV `text,category`
/// (an `answer` column is allowed and ignored) or a JSON array of entries, whose questions are
/// labelled with their entry's intent. The same parser as `kb import`, so the same checks and
/// line-numbered problems (`kb::ImportError::Invalid`); queries come grouped by category.
pub fn read_labelled(path: &Path) -> Result<Vec<LabelledQuery>, kb::ImportError> {
    let entries = kb::import_file(path)?;
    Ok(entries
        .into_iter()
        .flat_map(|entry| {
            let category = entry.intent;
            entry.questions.into_iter().map(move |text| LabelledQuery {
                text,
                category: category.clone(),
            })
        })
        .collect())
}

/// How the engine is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalMode {
    /// The server's path: caches, worker, model, lexical only when degraded.
    Model,
    /// The degraded path alone (BM25), to see what overload costs.
    Lexical,
}

/// Per-intent tallies.
#[derive(Debug, Default, Clone)]
struct IntentTally {
    total: usize,
    right: usize,
    /// Predicted intent (or "(fallback)") → count, for the wrong ones.
    wrong: HashMap<String, usize>,
}

/// The outcome of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub queries: usize,
    /// Answered with the right intent.
    pub right: usize,
    /// Right before the thresholds (the top-1 match alone).
    pub top1_right: usize,
    /// Not answered (below a threshold, or no match).
    pub fallbacks: usize,
    /// Recognitions that came from the lexical match.
    pub degraded: usize,
    /// Rows whose category the knowledge base does not have.
    pub unknown_categories: usize,
    /// Off-topic rows ([`NO_INTENT`]) and how many of them got the fallback, as they should.
    pub off_topic: usize,
    pub off_topic_fell_back: usize,
    /// Matches scored 0 because the nearest question was less similar than `min_similarity`.
    pub unrelated: usize,
    pub min_similarity: f64,
    /// Per query, in file order.
    pub latencies: Vec<Duration>,
    pub confidence_threshold: f64,
    pub margin_threshold: f64,
    per_intent: BTreeMap<String, IntentTally>,
    /// Per query with a match: (score, second score, top-1 right), for the threshold sweep.
    matches: Vec<(f32, f32, bool)>,
    /// Per query, in file order: what the engine recognised (for [`evaluate_variants`]).
    pub recognitions: Vec<Option<IntentResult>>,
}

const FALLBACK: &str = "(fallback)";
/// The category of a labelled query that must get the fallback (an off-topic question).
pub const NO_INTENT: &str = "(none)";

/// Runs every query through `engine` and the `intent` handler configured by `bot`, one at a
/// time.
pub fn evaluate(
    engine: &IntentEngine,
    bot: &BotConfig,
    queries: &[LabelledQuery],
    mode: EvalMode,
) -> EvalReport {
    let known_intents: HashSet<String> = engine.intents().into_iter().collect();
    let off_topic = queries.iter().filter(|q| q.category == NO_INTENT).count();
    let mut report = EvalReport {
        queries: queries.len() - off_topic,
        off_topic,
        off_topic_fell_back: 0,
        right: 0,
        top1_right: 0,
        fallbacks: 0,
        degraded: 0,
        unknown_categories: 0,
        unrelated: 0,
        min_similarity: bot.min_similarity,
        latencies: Vec::with_capacity(queries.len()),
        confidence_threshold: bot.confidence_threshold,
        margin_threshold: bot.margin_threshold,
        per_intent: BTreeMap::new(),
        matches: Vec::with_capacity(queries.len()),
        recognitions: Vec::with_capacity(queries.len()),
    };
    let mut handler = IntentAnswer::from_config(bot);
    for query in queries {
        let started = Instant::now();
        let result: Option<IntentResult> = match mode {
            EvalMode::Model => futures_lite::future::block_on(engine.recognise(&query.text)),
            EvalMode::Lexical => engine.recognise_lexically(&query.text),
        };
        report.latencies.push(started.elapsed());
        report.recognitions.push(result.clone());
        let off_topic = query.category == NO_INTENT;
        if off_topic {
            let answered = result.is_some_and(|result| {
                let mut ctx = BotContext::new(0, "eval", "eval", query.text.clone());
                ctx.intent = Some(result.into());
                matches!(handler.handle(&mut ctx), Verdict::Reply { .. })
            });
            report.off_topic_fell_back += usize::from(!answered);
            continue;
        }
        if !known_intents.contains(&query.category) {
            report.unknown_categories += 1;
        }
        if result.as_ref().is_some_and(|r| r.degraded) {
            report.degraded += 1;
        }
        if let Some(result) = &result {
            let similarity = result.similarity.map(f64::from);
            if similarity.is_some_and(|similarity| similarity < bot.min_similarity) {
                report.unrelated += 1;
            }
            let right = result.intent == query.category;
            report.top1_right += usize::from(right);
            report
                .matches
                .push((result.score, result.second_score, right));
        }
        let predicted = result.and_then(|result| {
            let mut ctx = BotContext::new(0, "eval", "eval", query.text.clone());
            ctx.intent = Some(result.into());
            match handler.handle(&mut ctx) {
                Verdict::Reply {
                    intent: Some(intent),
                    ..
                } => Some(intent),
                _ => None,
            }
        });
        let tally = report.per_intent.entry(query.category.clone()).or_default();
        tally.total += 1;
        match predicted {
            Some(intent) if intent == query.category => {
                report.right += 1;
                tally.right += 1;
            }
            Some(intent) => *tally.wrong.entry(intent).or_default() += 1,
            None => {
                report.fallbacks += 1;
                *tally.wrong.entry(FALLBACK.to_owned()).or_default() += 1;
            }
        }
    }
    report
}

impl EvalReport {
    /// Right answers over all queries, in percent.
    pub fn accuracy(&self) -> f64 {
        percent(self.right, self.queries)
    }

    /// What the thresholds would give: (answered, right) when answering matches with
    /// `score >= confidence` and `score - second >= margin` (the `intent` handler's rule).
    pub fn with_thresholds(&self, confidence: f64, margin: f64) -> (usize, usize) {
        let mut answered = 0;
        let mut right = 0;
        for &(score, second, correct) in &self.matches {
            let (score, second) = (f64::from(score), f64::from(second));
            if score >= confidence && score - second >= margin {
                answered += 1;
                right += usize::from(correct);
            }
        }
        (answered, right)
    }

    /// The `p`-th percentile latency (nearest rank), zero without queries.
    pub fn latency_percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Confidence thresholds shown in the sweep.
const SWEEP: [f64; 6] = [0.0, 0.2, 0.3, 0.4, 0.5, 0.7];
/// Intents listed in the confusion summary.
const WORST_SHOWN: usize = 10;
/// Wrong predictions listed per intent.
const CONFUSIONS_SHOWN: usize = 3;

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "accuracy: {:.2}%  ({} of {} right; a fallback counts as wrong)",
            self.accuracy(),
            self.right,
            self.queries
        )?;
        writeln!(
            f,
            "top-1 before thresholds: {:.2}%",
            percent(self.top1_right, self.queries)
        )?;
        let answered = self.queries - self.fallbacks;
        writeln!(
            f,
            "fallback rate: {:.2}%  ({} of {}; confidence_threshold {}, margin_threshold {})",
            percent(self.fallbacks, self.queries),
            self.fallbacks,
            self.queries,
            self.confidence_threshold,
            self.margin_threshold
        )?;
        writeln!(
            f,
            "answered: {answered}, {:.2}% of them right",
            percent(self.right, answered)
        )?;
        writeln!(
            f,
            "unrelated (nearest question below min_similarity {}): {}",
            self.min_similarity, self.unrelated
        )?;
        writeln!(f, "degraded (lexical) recognitions: {}", self.degraded)?;
        if self.off_topic > 0 {
            writeln!(
                f,
                "off-topic rows ({NO_INTENT}): {} of {} got the fallback ({:.2}%)",
                self.off_topic_fell_back,
                self.off_topic,
                percent(self.off_topic_fell_back, self.off_topic)
            )?;
        }
        if self.unknown_categories > 0 {
            writeln!(
                f,
                "rows with a category the knowledge base does not have: {}",
                self.unknown_categories
            )?;
        }
        let total: Duration = self.latencies.iter().sum();
        writeln!(
            f,
            "latency per query, one at a time: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  mean {:.2} ms",
            ms(self.latency_percentile(50.0)),
            ms(self.latency_percentile(90.0)),
            ms(self.latency_percentile(99.0)),
            ms(self.latency_percentile(100.0)),
            ms(total) / self.latencies.len().max(1) as f64,
        )?;
        writeln!(
            f,
            "other thresholds (answer when score >= confidence and score - second >= margin):"
        )?;
        writeln!(
            f,
            "  confidence  margin  answered  right of answered  accuracy"
        )?;
        let margins = [0.0, self.margin_threshold];
        let margins = if self.margin_threshold == 0.0 {
            &margins[..1]
        } else {
            &margins[..]
        };
        for confidence in SWEEP {
            for &margin in margins {
                let (answered, right) = self.with_thresholds(confidence, margin);
                writeln!(
                    f,
                    "  {confidence:<10.2}  {margin:<6.2}  {:>7.2}%  {:>16.2}%  {:>7.2}%",
                    percent(answered, self.queries),
                    percent(right, answered),
                    percent(right, self.queries)
                )?;
            }
        }
        let mut worst: Vec<(&String, &IntentTally)> = self
            .per_intent
            .iter()
            .filter(|(_, tally)| tally.right < tally.total)
            .collect();
        worst.sort_by(|a, b| {
            let accuracy = |t: &IntentTally| t.right as f64 / t.total as f64;
            accuracy(a.1)
                .total_cmp(&accuracy(b.1))
                .then(b.1.total.cmp(&a.1.total))
                .then(a.0.cmp(b.0))
        });
        let perfect = self.per_intent.len() - worst.len();
        writeln!(
            f,
            "per intent: {} intents, {perfect} without an error; worst {}:",
            self.per_intent.len(),
            worst.len().min(WORST_SHOWN)
        )?;
        let width = worst
            .iter()
            .take(WORST_SHOWN)
            .map(|(name, _)| name.chars().count())
            .max()
            .unwrap_or(0);
        for (name, tally) in worst.iter().take(WORST_SHOWN) {
            let mut wrong: Vec<(&String, &usize)> = tally.wrong.iter().collect();
            wrong.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let confusions: Vec<String> = wrong
                .iter()
                .take(CONFUSIONS_SHOWN)
                .map(|(intent, count)| format!("{intent} ×{count}"))
                .collect();
            writeln!(
                f,
                "  {name:width$}  {:>3}/{:<3} {:>6.2}%  wrong: {}",
                tally.right,
                tally.total,
                percent(tally.right, tally.total),
                confusions.join(", ")
            )?;
        }
        Ok(())
    }
}

/// One gray-release variant's results ([`evaluate_variants`]).
#[derive(Debug, Clone, PartialEq)]
pub struct VariantEval {
    pub name: String,
    /// Its `model` (`None`: the node's cascade).
    pub model: Option<VariantModel>,
    /// Its share of new conversations, in percent of all weights.
    pub share: f64,
    /// Rows with an intent (off-topic rows apart).
    pub queries: usize,
    /// Replies that were not the fallback.
    pub answered: usize,
    /// Replies naming the row's intent.
    pub right: usize,
    /// Fallback turns (a failed reply, or a chain that decided nothing).
    pub fallbacks: usize,
    /// Hand-offs to a human.
    pub handoffs: usize,
    pub off_topic: usize,
    /// Off-topic rows that did not get an answer (the fallback or a hand-off), as they should.
    pub off_topic_unanswered: usize,
    /// Why the variant's chain could not be built (then nothing above was counted).
    pub error: Option<String>,
}

/// Runs every configured variant's answer chain (`[[bot.variants]]`, or the one default
/// variant) on `recognitions` (from [`evaluate`], in the order of `queries`), or, for a variant
/// with its own `model`, on what `recognise` answers for each query with that model's
/// [`Cascade`] (asked once per query and setting, whatever the number of variants sharing it).
/// A handler that would answer later (waiting for an outside service) counts as a fallback:
/// nothing outside is asked here.
pub fn evaluate_variants(
    recognitions: &[Option<IntentResult>],
    queries: &[LabelledQuery],
    config: &Config,
    registry: &Registry,
    mut recognise: impl FnMut(&LabelledQuery, Cascade) -> Option<IntentResult>,
) -> Vec<VariantEval> {
    let variants = config.bot.effective_variants();
    let total: f64 = variants.iter().map(|v| v.weight).sum();
    let mut again: HashMap<Cascade, Vec<Option<IntentResult>>> = HashMap::new();
    for variant in &variants {
        let cascade = Cascade::of_variant(variant.model);
        if cascade != Cascade::Configured && !again.contains_key(&cascade) {
            let results = queries
                .iter()
                .map(|query| recognise(query, cascade))
                .collect();
            again.insert(cascade, results);
        }
    }
    variants
        .iter()
        .map(|variant| {
            let recognitions = again
                .get(&Cascade::of_variant(variant.model))
                .map_or(recognitions, Vec::as_slice);
            let mut eval = VariantEval {
                name: variant.name.clone(),
                model: variant.model,
                share: if total > 0.0 {
                    100.0 * variant.weight / total
                } else {
                    0.0
                },
                queries: 0,
                answered: 0,
                right: 0,
                fallbacks: 0,
                handoffs: 0,
                off_topic: 0,
                off_topic_unanswered: 0,
                error: None,
            };
            let names: Vec<&str> = variant.answer_handlers.iter().map(|h| h.as_str()).collect();
            let specs: Vec<HandlerSpec<'_>> = names.iter().map(|n| HandlerSpec::new(n)).collect();
            let mut chain =
                match Chain::from_specs(registry, &specs, &variant.bot, &config.risk_control) {
                    Ok(chain) => chain,
                    Err(err) => {
                        eval.error = Some(err.to_string());
                        return eval;
                    }
                };
            for (query, recognised) in queries.iter().zip(recognitions) {
                let mut ctx = BotContext::new(0, "eval", "eval", query.text.clone());
                ctx.intent = recognised.clone().map(Into::into);
                let (verdict, _) = chain.run(&mut ctx, 0);
                let (answered, intent, handoff) = match verdict {
                    Verdict::Reply {
                        failed: false,
                        intent,
                        ..
                    } => (true, intent, false),
                    Verdict::Handoff { .. } => (false, None, true),
                    _ => (false, None, false),
                };
                if query.category == NO_INTENT {
                    eval.off_topic += 1;
                    eval.off_topic_unanswered += usize::from(!answered);
                    continue;
                }
                eval.queries += 1;
                eval.answered += usize::from(answered);
                eval.right += usize::from(answered && intent.as_deref() == Some(&query.category));
                eval.handoffs += usize::from(handoff);
                eval.fallbacks += usize::from(!answered && !handoff);
            }
            eval
        })
        .collect()
}

/// The per-variant table `kb eval` prints.
pub struct VariantTable<'a>(pub &'a [VariantEval]);

impl fmt::Display for VariantTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "gray-release variants (each variant's handlers and thresholds on the same recognitions; \
             a variant with its own model on recognitions made again with it):"
        )?;
        let width = self
            .0
            .iter()
            .map(|v| v.name.chars().count())
            .max()
            .unwrap_or(0)
            .max("variant".len());
        writeln!(
            f,
            "  {:width$}  model      share    answered  right of answered  accuracy  fallbacks  handoffs  off-topic unanswered",
            "variant"
        )?;
        for v in self.0 {
            let model = v.model.map_or("node", VariantModel::as_str);
            if let Some(error) = &v.error {
                writeln!(
                    f,
                    "  {:width$}  {model:9}  {:>5.1}%  cannot run: {error}",
                    v.name, v.share
                )?;
                continue;
            }
            let off_topic = if v.off_topic == 0 {
                "-".to_owned()
            } else {
                format!("{} of {}", v.off_topic_unanswered, v.off_topic)
            };
            writeln!(
                f,
                "  {:width$}  {model:9}  {:>5.1}%  {:>7.2}%  {:>16.2}%  {:>7.2}%  {:>9}  {:>8}  {off_topic}",
                v.name,
                v.share,
                percent(v.answered, v.queries),
                percent(v.right, v.answered),
                percent(v.right, v.queries),
                v.fallbacks,
                v.handoffs,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::intent::CacheOutcome;

    fn recognised(intent: &str, score: f32) -> Option<IntentResult> {
        Some(IntentResult {
            version: 1,
            entry: 0,
            entry_id: intent.into(),
            intent: intent.into(),
            answer: format!("about {intent}"),
            score,
            second_score: 0.0,
            similarity: Some(score),
            degraded: false,
            cache: CacheOutcome::Miss,
        })
    }

    /// The `recognise` of [`evaluate_variants`] for variants without a `model`: never asked.
    fn no_model_of_their_own(_: &LabelledQuery, _: Cascade) -> Option<IntentResult> {
        panic!("no variant has its own model")
    }

    #[test]
    fn variants_differ_by_their_handlers_and_thresholds_on_the_same_recognitions() {
        let config = crate::config::load_str(
            "t.toml",
            "[bot]\nconfidence_threshold = 0.4\nmargin_threshold = 0.0\n\
             [[bot.variants]]\nname = \"control\"\nweight = 80\n\
             [[bot.variants]]\nname = \"strict\"\nweight = 10\nconfidence_threshold = 0.7\n\
             [[bot.variants]]\nname = \"echo\"\nweight = 10\nhandlers = [\"echo\"]\n",
        )
        .unwrap();
        let query = |text: &str, category: &str| LabelledQuery {
            text: text.into(),
            category: category.into(),
        };
        let queries = [
            query("where is my card", "card_arrival"),
            query("card still not here", "card_arrival"),
            query("how old must I be", "age_limit"),
            query("weather on mars", NO_INTENT),
        ];
        let recognitions = [
            recognised("card_arrival", 0.9),
            recognised("card_arrival", 0.5),
            recognised("card_arrival", 0.45),
            recognised("age_limit", 0.2),
        ];
        let table = evaluate_variants(
            &recognitions,
            &queries,
            &config,
            &Registry::default(),
            no_model_of_their_own,
        );
        let by_name = |name: &str| table.iter().find(|v| v.name == name).unwrap().clone();
        let control = by_name("control");
        assert_eq!(
            (control.answered, control.right, control.fallbacks),
            (3, 2, 0)
        );
        assert_eq!((control.off_topic, control.off_topic_unanswered), (1, 1));
        assert_eq!(control.share, 80.0);
        let strict = by_name("strict");
        assert_eq!((strict.answered, strict.right, strict.fallbacks), (1, 1, 2));
        let echo = by_name("echo");
        assert_eq!(
            (echo.answered, echo.right, echo.off_topic_unanswered),
            (3, 0, 0)
        );
        let text = VariantTable(&table).to_string();
        assert!(text.contains("strict"), "{text}");
        // No variants: the one default variant of [bot].
        let plain = crate::config::Config::default();
        let table = evaluate_variants(
            &recognitions,
            &queries,
            &plain,
            &Registry::default(),
            no_model_of_their_own,
        );
        assert_eq!(table.len(), 1);
        assert_eq!(table[0].name, "default");
    }

    #[test]
    fn a_variant_with_its_own_model_is_evaluated_on_recognitions_made_with_it() {
        let config = crate::config::load_str(
            "t.toml",
            "[inference]\ncompanion_model = \"c.onnx\"\ncompanion_tokenizer = \"c.json\"\n\
             [bot]\nconfidence_threshold = 0.4\nmargin_threshold = 0.0\n\
             [[bot.variants]]\nname = \"node\"\nweight = 1\n\
             [[bot.variants]]\nname = \"english\"\nweight = 1\nmodel = \"primary\"\n\
             [[bot.variants]]\nname = \"both\"\nweight = 1\nmodel = \"companion\"\n\
             [[bot.variants]]\nname = \"both_strict\"\nweight = 1\nmodel = \"companion\"\n\
             confidence_threshold = 0.95\n",
        )
        .unwrap();
        let queries = [
            LabelledQuery {
                text: "我的卡还没到".into(),
                category: "card_arrival".into(),
            },
            LabelledQuery {
                text: "how old must I be".into(),
                category: "age_limit".into(),
            },
        ];
        // The node's cascade got the first wrong; the primary model alone gets both wrong; both
        // models get both right.
        let node = [recognised("age_limit", 0.5), recognised("age_limit", 0.9)];
        let mut asked = Vec::new();
        let table = evaluate_variants(
            &node,
            &queries,
            &config,
            &Registry::default(),
            |query, cascade| {
                asked.push((query.text.clone(), cascade));
                match cascade {
                    Cascade::PrimaryOnly => recognised("change_pin", 0.9),
                    _ => recognised(&query.category, 0.9),
                }
            },
        );
        // Once per query and setting, not per variant.
        assert_eq!(asked.len(), 4, "{asked:?}");
        let right: Vec<(String, Option<VariantModel>, usize)> = table
            .iter()
            .map(|v| (v.name.clone(), v.model, v.right))
            .collect();
        assert_eq!(
            right,
            [
                ("node".to_owned(), None, 1),
                ("english".to_owned(), Some(VariantModel::Primary), 0),
                ("both".to_owned(), Some(VariantModel::Companion), 2),
                ("both_strict".to_owned(), Some(VariantModel::Companion), 0),
            ]
        );
        let text = VariantTable(&table).to_string();
        assert!(text.contains("english      primary"), "{text}");
    }

    #[test]
    fn labelled_queries_come_from_the_import_parser() {
        let dir = std::env::temp_dir().join(format!("switchboard-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("labelled.csv");
        std::fs::write(&path, "category,text\ncard_arrival,where is my card?\n\nfx,\"rate, please\"\ncard_arrival,still no card\n").unwrap();
        let query = |text: &str, category: &str| LabelledQuery {
            text: text.into(),
            category: category.into(),
        };
        assert_eq!(
            read_labelled(&path).unwrap(),
            vec![
                query("where is my card?", "card_arrival"),
                query("still no card", "card_arrival"),
                query("rate, please", "fx"),
            ]
        );
        std::fs::write(&path, "text,category\nok,a\n,b\n").unwrap();
        let error = read_labelled(&path).unwrap_err().to_string();
        assert!(error.contains("line 3"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let report = EvalReport {
            queries: 4,
            right: 3,
            top1_right: 4,
            fallbacks: 1,
            degraded: 0,
            unknown_categories: 0,
            off_topic: 0,
            off_topic_fell_back: 0,
            unrelated: 0,
            min_similarity: 0.5,
            latencies: [4, 1, 3, 2].map(Duration::from_millis).to_vec(),
            recognitions: Vec::new(),
            confidence_threshold: 0.5,
            margin_threshold: 0.05,
            per_intent: BTreeMap::new(),
            matches: vec![
                (0.9, 0.1, true),
                (0.6, 0.58, true),
                (0.4, 0.1, false),
                (0.8, 0.0, true),
            ],
        };
        assert_eq!(report.with_thresholds(0.5, 0.05), (2, 2));
        assert_eq!(report.with_thresholds(0.0, 0.0), (4, 3));
        assert_eq!(report.latency_percentile(50.0), Duration::from_millis(2));
        assert_eq!(report.latency_percentile(99.0), Duration::from_millis(4));
        assert_eq!(report.accuracy(), 75.0);
        assert!(report.to_string().starts_with("accuracy: 75.00%"));
    }
}
