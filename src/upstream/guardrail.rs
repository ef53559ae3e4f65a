//! Amazon Bedrock Guardrails as a content filter: `ApplyGuardrail` with source `INPUT` on a
//! call's arguments and `OUTPUT` on the tool's response. A guardrail that blocks (a denied
//! topic, a content or word filter, a PII entity set to block) blocks the call with
//! `content_blocked`; one that only anonymises hands back masked text, which replaces the
//! content. A guardrail that cannot be asked (timeout, throttling, any service error) fails
//! closed with `unavailable`.

use std::time::Duration;

use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::types::{
    GuardrailAction, GuardrailAssessment, GuardrailContentBlock, GuardrailContentSource, GuardrailTextBlock,
};
use tokio::sync::OnceCell;

pub use crate::policy::content::GuardrailConfig;

/// What the guardrail said.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Anonymised only: the masked text replaces the content.
    Masked {
        text: String,
        summary: String,
    },
    Blocked {
        summary: String,
    },
}

/// Which side of the call is checked.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Input,
    Output,
}

#[derive(Default)]
pub struct Guardrails {
    region: Option<String>,
    client: OnceCell<Client>,
}

impl Guardrails {
    pub fn new(region: Option<String>) -> Self {
        Self {
            region,
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async { Client::new(&super::aws_sdk::sdk_config(self.region.clone()).await) })
            .await
    }

    /// Asks the guardrail about `text`. `Err` is a message for `unavailable`.
    pub async fn apply(&self, g: &GuardrailConfig, source: Source, text: &str) -> Result<Verdict, String> {
        let block = GuardrailTextBlock::builder()
            .text(text)
            .build()
            .map_err(|e| e.to_string())?;
        let request = self
            .client()
            .await
            .apply_guardrail()
            .guardrail_identifier(&g.id)
            .guardrail_version(&g.version)
            .source(match source {
                Source::Input => GuardrailContentSource::Input,
                Source::Output => GuardrailContentSource::Output,
            })
            .content(GuardrailContentBlock::Text(block))
            .send();
        let out = tokio::time::timeout(Duration::from_millis(g.timeout_ms), request)
            .await
            .map_err(|_| format!("no answer within {} ms", g.timeout_ms))?
            .map_err(|e| aws_sdk_bedrockruntime::error::DisplayErrorContext(&e).to_string())?;
        if *out.action() != GuardrailAction::GuardrailIntervened {
            return Ok(Verdict::Pass);
        }
        let (summary, blocking) = summarise(out.assessments());
        let masked = out.outputs().first().and_then(|o| o.text()).map(str::to_owned);
        Ok(match masked {
            Some(text) if !blocking => Verdict::Masked { text, summary },
            _ => Verdict::Blocked { summary },
        })
    }
}

/// A short, value-free summary of what intervened, and whether anything blocks (rather than
/// only anonymises).
fn summarise(assessments: &[GuardrailAssessment]) -> (String, bool) {
    let mut parts = Vec::new();
    let mut blocking = false;
    for a in assessments {
        if let Some(t) = a.topic_policy() {
            for topic in t.topics() {
                parts.push(format!("topic '{}' {}", topic.name(), topic.action().as_str()));
                blocking |= topic.action().as_str() == "BLOCKED";
            }
        }
        if let Some(c) = a.content_policy() {
            for f in c.filters() {
                parts.push(format!("content {} {}", f.r#type().as_str(), f.action().as_str()));
                blocking |= f.action().as_str() == "BLOCKED";
            }
        }
        if let Some(w) = a.word_policy() {
            for x in w.custom_words() {
                parts.push(format!("word {}", x.action().as_str()));
                blocking |= x.action().as_str() == "BLOCKED";
            }
            for x in w.managed_word_lists() {
                parts.push(format!("word list {}", x.action().as_str()));
                blocking |= x.action().as_str() == "BLOCKED";
            }
        }
        if let Some(s) = a.sensitive_information_policy() {
            for e in s.pii_entities() {
                parts.push(format!("pii {} {}", e.r#type().as_str(), e.action().as_str()));
                blocking |= e.action().as_str() == "BLOCKED";
            }
            for r in s.regexes() {
                parts.push(format!("regex {} {}", r.name().unwrap_or("?"), r.action().as_str()));
                blocking |= r.action().as_str() == "BLOCKED";
            }
        }
    }
    if parts.is_empty() {
        // Intervened without saying why: block.
        return ("intervened".to_owned(), true);
    }
    (parts.join(", "), blocking)
}
