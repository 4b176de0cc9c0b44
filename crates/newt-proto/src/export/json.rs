//! The JSON layer of a key export: the decrypted text must be one array of
//! keys, split here into the text of each key without parsing it (serde
//! parses each, one at a time).

use zeroize::{Zeroize, Zeroizing};

use super::ExportError;

/// Splits a stream of JSON text that must be one array into the raw text of
/// its elements, without parsing them (serde does, one element at a time).
#[derive(Default)]
pub(super) struct ArraySplitter {
    state: SplitState,
    depth: usize,
    in_string: bool,
    escaped: bool,
    element: Zeroizing<Vec<u8>>,
}

#[derive(Default, PartialEq)]
enum SplitState {
    /// Before the `[`.
    #[default]
    Start,
    /// Inside the array, before an element (or the `]` of an empty array).
    BeforeElement { first: bool },
    /// Inside an element.
    InElement,
    /// After an element: `,` or `]`.
    AfterElement,
    /// After the `]`: only whitespace may follow.
    End,
}

impl ArraySplitter {
    /// Feeds `text`; calls `on_element` with each complete element.
    pub(super) fn feed(
        &mut self,
        text: &[u8],
        mut on_element: impl FnMut(&[u8]) -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        let bad = |what: &str| ExportError::Json(format!("not an array of keys: {what}"));
        let mut i = 0;
        while let Some(&b) = text.get(i) {
            // Inside an element, copy runs of bytes that change nothing.
            if self.state == SplitState::InElement && !self.escaped {
                let rest = &text[i..];
                let run = if self.in_string {
                    rest.iter().position(|&c| c == b'"' || c == b'\\')
                } else {
                    rest.iter().position(|&c| matches!(c, b'"' | b'{' | b'}' | b'[' | b']' | b','))
                }
                .unwrap_or(rest.len());
                if run > 0 {
                    self.element.extend_from_slice(&rest[..run]);
                    i += run;
                    continue;
                }
            }
            i += 1;
            // JSON's whitespace (not form feed, unlike `is_ascii_whitespace`).
            let space = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
            match self.state {
                SplitState::Start | SplitState::End if space => {}
                SplitState::Start if b == b'[' => {
                    self.state = SplitState::BeforeElement { first: true };
                }
                SplitState::Start => return Err(bad("expected `[`")),
                SplitState::End => return Err(bad("trailing characters")),
                SplitState::BeforeElement { .. } | SplitState::AfterElement if space => {}
                SplitState::BeforeElement { first: true } | SplitState::AfterElement
                    if b == b']' =>
                {
                    self.state = SplitState::End;
                }
                SplitState::AfterElement if b == b',' => {
                    self.state = SplitState::BeforeElement { first: false };
                }
                SplitState::AfterElement => return Err(bad("expected `,` or `]`")),
                SplitState::BeforeElement { .. } => {
                    self.state = SplitState::InElement;
                    self.depth = 0;
                    self.element.zeroize();
                    self.push(b, &mut on_element)?;
                }
                SplitState::InElement => self.push(b, &mut on_element)?,
            }
        }
        Ok(())
    }

    fn push(
        &mut self,
        b: u8,
        on_element: &mut impl FnMut(&[u8]) -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        if self.in_string {
            self.element.push(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return Ok(());
        }
        // A scalar element ends at a `,` or `]` outside any string.
        if self.depth == 0 && (b == b',' || b == b']') {
            on_element(&self.element)?;
            self.state = if b == b',' {
                SplitState::BeforeElement { first: false }
            } else {
                SplitState::End
            };
            return Ok(());
        }
        self.element.push(b);
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth = self.depth.checked_sub(1).ok_or_else(|| {
                    ExportError::Json("not an array of keys: unbalanced brackets".into())
                })?;
                if self.depth == 0 {
                    on_element(&self.element)?;
                    self.state = SplitState::AfterElement;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The text ended: it must have been a whole array.
    pub(super) fn finish(&self) -> Result<(), ExportError> {
        if self.state == SplitState::End {
            Ok(())
        } else {
            Err(ExportError::Json("not an array of keys: EOF while parsing".into()))
        }
    }
}

/// serde_json quotes offending strings in some messages (`invalid type:
/// string "..."`), which could be key material; keep only what precedes.
pub(super) fn json_error(error: serde_json::Error) -> ExportError {
    let message = error.to_string();
    match message.split_once('"') {
        None => ExportError::Json(message),
        Some((before, _)) => ExportError::Json(format!(
            "{} at line {} column {}",
            before.trim_end(),
            error.line(),
            error.column()
        )),
    }
}
