//! The SAS emoji table (spec `data-definitions/sas-emoji.json`): number,
//! emoji and English description. Entries 21, 29, 37, 43, 45, 49 and 53
//! include the variation selector U+FE0F.

/// One SAS emoji.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Emoji {
    /// Its number (0..=63), the index the SAS bytes select.
    pub number: u8,
    /// The emoji itself.
    pub symbol: &'static str,
    /// The English description, e.g. `Dog`.
    pub description: &'static str,
}

/// The 64 SAS emoji, indexed by number.
pub const EMOJI: [Emoji; 64] = [
    Emoji { number: 0, symbol: "🐶", description: "Dog" },
    Emoji { number: 1, symbol: "🐱", description: "Cat" },
    Emoji { number: 2, symbol: "🦁", description: "Lion" },
    Emoji { number: 3, symbol: "🐎", description: "Horse" },
    Emoji { number: 4, symbol: "🦄", description: "Unicorn" },
    Emoji { number: 5, symbol: "🐷", description: "Pig" },
    Emoji { number: 6, symbol: "🐘", description: "Elephant" },
    Emoji { number: 7, symbol: "🐰", description: "Rabbit" },
    Emoji { number: 8, symbol: "🐼", description: "Panda" },
    Emoji { number: 9, symbol: "🐓", description: "Rooster" },
    Emoji { number: 10, symbol: "🐧", description: "Penguin" },
    Emoji { number: 11, symbol: "🐢", description: "Turtle" },
    Emoji { number: 12, symbol: "🐟", description: "Fish" },
    Emoji { number: 13, symbol: "🐙", description: "Octopus" },
    Emoji { number: 14, symbol: "🦋", description: "Butterfly" },
    Emoji { number: 15, symbol: "🌷", description: "Flower" },
    Emoji { number: 16, symbol: "🌳", description: "Tree" },
    Emoji { number: 17, symbol: "🌵", description: "Cactus" },
    Emoji { number: 18, symbol: "🍄", description: "Mushroom" },
    Emoji { number: 19, symbol: "🌏", description: "Globe" },
    Emoji { number: 20, symbol: "🌙", description: "Moon" },
    Emoji { number: 21, symbol: "☁️", description: "Cloud" },
    Emoji { number: 22, symbol: "🔥", description: "Fire" },
    Emoji { number: 23, symbol: "🍌", description: "Banana" },
    Emoji { number: 24, symbol: "🍎", description: "Apple" },
    Emoji { number: 25, symbol: "🍓", description: "Strawberry" },
    Emoji { number: 26, symbol: "🌽", description: "Corn" },
    Emoji { number: 27, symbol: "🍕", description: "Pizza" },
    Emoji { number: 28, symbol: "🎂", description: "Cake" },
    Emoji { number: 29, symbol: "❤️", description: "Heart" },
    Emoji { number: 30, symbol: "😀", description: "Smiley" },
    Emoji { number: 31, symbol: "🤖", description: "Robot" },
    Emoji { number: 32, symbol: "🎩", description: "Hat" },
    Emoji { number: 33, symbol: "👓", description: "Glasses" },
    Emoji { number: 34, symbol: "🔧", description: "Spanner" },
    Emoji { number: 35, symbol: "🎅", description: "Santa" },
    Emoji { number: 36, symbol: "👍", description: "Thumbs Up" },
    Emoji { number: 37, symbol: "☂️", description: "Umbrella" },
    Emoji { number: 38, symbol: "⌛", description: "Hourglass" },
    Emoji { number: 39, symbol: "⏰", description: "Clock" },
    Emoji { number: 40, symbol: "🎁", description: "Gift" },
    Emoji { number: 41, symbol: "💡", description: "Light Bulb" },
    Emoji { number: 42, symbol: "📕", description: "Book" },
    Emoji { number: 43, symbol: "✏️", description: "Pencil" },
    Emoji { number: 44, symbol: "📎", description: "Paperclip" },
    Emoji { number: 45, symbol: "✂️", description: "Scissors" },
    Emoji { number: 46, symbol: "🔒", description: "Lock" },
    Emoji { number: 47, symbol: "🔑", description: "Key" },
    Emoji { number: 48, symbol: "🔨", description: "Hammer" },
    Emoji { number: 49, symbol: "☎️", description: "Telephone" },
    Emoji { number: 50, symbol: "🏁", description: "Flag" },
    Emoji { number: 51, symbol: "🚂", description: "Train" },
    Emoji { number: 52, symbol: "🚲", description: "Bicycle" },
    Emoji { number: 53, symbol: "✈️", description: "Aeroplane" },
    Emoji { number: 54, symbol: "🚀", description: "Rocket" },
    Emoji { number: 55, symbol: "🏆", description: "Trophy" },
    Emoji { number: 56, symbol: "⚽", description: "Ball" },
    Emoji { number: 57, symbol: "🎸", description: "Guitar" },
    Emoji { number: 58, symbol: "🎺", description: "Trumpet" },
    Emoji { number: 59, symbol: "🔔", description: "Bell" },
    Emoji { number: 60, symbol: "⚓", description: "Anchor" },
    Emoji { number: 61, symbol: "🎧", description: "Headphones" },
    Emoji { number: 62, symbol: "📁", description: "Folder" },
    Emoji { number: 63, symbol: "📌", description: "Pin" },
];

/// The emoji with this number; `None` above 63.
pub fn emoji(number: u8) -> Option<Emoji> {
    EMOJI.get(usize::from(number)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_indexed_by_number() {
        for (i, e) in EMOJI.iter().enumerate() {
            assert_eq!(usize::from(e.number), i);
        }
        assert_eq!(emoji(63).map(|e| e.description), Some("Pin"));
        assert_eq!(emoji(64), None);
        assert_eq!(emoji(53).map(|e| e.symbol), Some("\u{2708}\u{fe0f}"));
    }
}
