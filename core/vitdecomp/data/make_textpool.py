"""Generate vitdecomp's default TextSpan text pool (``textpool.txt``).

The pool is written for this project (MIT, like vitdecomp): short image descriptions composed from word lists of
objects, attributes, materials, scenes, lighting, weather, photographic styles, people and activities. It covers the
kinds of concepts TextSpan should be able to name (colours, textures, counts, locations, styles, object categories)
without copying any existing pool. The output is deterministic: the script uses a fixed seed and sorted inputs.

Run ``python make_textpool.py`` (writes ``textpool.txt`` next to this file) or
``python make_textpool.py --out other.txt --size 3000``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

__all__ = ["build_pool"]

OBJECTS = {
    "animals": [
        "dog", "puppy", "cat", "kitten", "horse", "cow", "sheep", "goat", "pig", "rabbit", "squirrel", "fox", "wolf",
        "bear", "deer", "lion", "tiger", "leopard", "elephant", "giraffe", "zebra", "camel", "monkey", "gorilla",
        "kangaroo", "panda", "owl", "eagle", "parrot", "duck", "swan", "pigeon", "flamingo", "penguin", "seagull",
        "hummingbird", "butterfly", "bee", "spider", "snake", "lizard", "turtle", "frog", "crab", "jellyfish",
        "shark", "dolphin", "whale", "goldfish", "octopus",
    ],
    "vehicles": [
        "car", "sports car", "truck", "bus", "van", "motorcycle", "bicycle", "scooter", "train", "tram", "tractor",
        "airplane", "helicopter", "sailboat", "canoe", "ship", "submarine", "hot air balloon", "rocket", "skateboard",
    ],
    "food": [
        "pizza", "burger", "sandwich", "salad", "bowl of soup", "plate of pasta", "sushi", "cake", "cupcake", "donut",
        "croissant", "loaf of bread", "apple", "banana", "orange", "strawberry", "lemon", "watermelon", "pineapple",
        "tomato", "carrot", "broccoli", "mushroom", "egg", "cheese", "cup of coffee", "cup of tea", "glass of wine",
        "ice cream cone", "chocolate bar",
    ],
    "household": [
        "chair", "sofa", "bed", "table", "desk", "lamp", "bookshelf", "clock", "mirror", "vase", "teapot", "mug",
        "bottle", "candle", "pillow", "blanket", "umbrella", "suitcase", "backpack", "handbag", "wallet", "key",
        "pair of scissors", "hammer", "screwdriver", "broom", "bucket", "basket", "box", "jar",
    ],
    "technology": [
        "laptop", "computer keyboard", "computer mouse", "smartphone", "television", "camera", "headphones",
        "microphone", "radio", "printer", "robot", "drone", "wristwatch", "game controller", "light bulb",
    ],
    "clothing": [
        "shirt", "dress", "jacket", "coat", "sweater", "scarf", "hat", "cap", "pair of shoes", "pair of boots",
        "sneakers", "tie", "pair of gloves", "pair of sunglasses", "necklace", "ring", "uniform", "swimsuit",
    ],
    "sports": [
        "soccer ball", "basketball", "tennis racket", "baseball bat", "golf club", "surfboard", "snowboard",
        "pair of skis", "kite", "frisbee", "chess board", "guitar", "piano", "violin", "drum",
    ],
    "nature": [
        "tree", "palm tree", "pine tree", "flower", "rose", "sunflower", "tulip", "cactus", "fern", "leaf", "rock",
        "boulder", "waterfall", "river", "lake", "mountain", "volcano", "glacier", "cloud", "rainbow", "sand dune",
        "wave", "island", "cave", "field of grass",
    ],
    "structures": [
        "house", "cottage", "skyscraper", "castle", "church", "temple", "bridge", "tower", "lighthouse", "windmill",
        "barn", "fence", "gate", "staircase", "fountain", "statue", "tent", "swimming pool", "playground", "road sign",
        "traffic light", "street lamp", "bench", "mailbox", "parking lot",
    ],
}

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "golden",
          "silver", "beige", "turquoise", "dark", "pale", "bright", "colorful", "multicolored"]
TEXTURES = ["rough", "smooth", "furry", "fluffy", "shiny", "glossy", "matte", "wrinkled", "cracked", "rusty", "wet",
            "dusty", "muddy", "frozen", "spiky", "soft", "slimy", "scaly", "woolly", "sleek"]
PATTERNS = ["striped", "spotted", "checkered", "polka dot", "plaid", "floral", "zigzag", "camouflage", "paisley",
            "geometric", "plain", "marbled", "dotted", "wavy", "grid"]
MATERIALS = ["wooden", "metal", "plastic", "glass", "stone", "ceramic", "paper", "leather", "rubber", "concrete",
             "brick", "woven", "knitted", "velvet", "silk", "cotton", "denim", "linen", "bamboo", "marble"]
SIZES = ["tiny", "small", "large", "huge", "tall", "long", "narrow", "wide", "round", "square", "triangular",
         "rectangular", "circular", "curved", "pointed", "flat", "thin", "thick", "hollow", "octagonal"]
STATES = ["old", "new", "broken", "abandoned", "damaged", "clean", "dirty", "empty", "full", "open", "closed",
          "wet", "burning", "floating", "hanging", "stacked", "scattered", "half-eaten", "vintage", "modern"]
SCENES = [
    "a beach", "the ocean", "a lake", "a river", "a forest", "a jungle", "a desert", "a snowy mountain", "a meadow",
    "a farm", "a garden", "a park", "a city street", "a busy market", "a parking lot", "a highway", "a train station",
    "an airport", "a harbor", "a kitchen", "a living room", "a bedroom", "a bathroom", "an office", "a classroom",
    "a library", "a restaurant", "a cafe", "a supermarket", "a museum", "a stadium", "a gym", "a hospital",
    "a factory", "a warehouse", "a construction site", "a church", "a swamp", "a marsh", "a canyon", "a cave",
    "a bamboo grove", "a field of flowers", "a rooftop", "an alley", "a village", "a playground", "a zoo",
    "an aquarium", "outer space", "underwater", "the sky", "a snowy field", "a rice field", "a vineyard",
]
LIGHT = ["at night", "at sunset", "at sunrise", "at dusk", "in bright sunlight", "in the shade", "under neon lights",
         "by candlelight", "in the fog", "in the rain", "in the snow", "during a storm", "on a cloudy day",
         "in autumn", "in winter", "in spring", "in summer", "with a blue sky", "backlit", "in dim light"]
STYLES = [
    "a photo", "a close-up photo", "a macro photo", "an aerial photo", "a black and white photo", "a blurry photo",
    "a grainy photo", "an overexposed photo", "a dark photo", "a long exposure photo", "a panoramic photo",
    "a selfie", "a painting", "a watercolor painting", "an oil painting", "a pencil sketch", "a cartoon",
    "a comic illustration", "a 3D rendering", "a pixel art image", "a vintage photograph", "an infrared image",
    "a tattoo", "an embroidery", "a mosaic", "a sculpture", "a toy model", "a drawing by a child", "a poster",
    "a low resolution image", "a cropped photo", "a tilted photo", "a photo taken through a window",
    "a reflection in a mirror", "a silhouette", "a diagram", "a map", "a screenshot", "a logo", "a sticker",
]
PEOPLE = ["a man", "a woman", "a child", "a baby", "an old man", "an old woman", "a teenager", "a group of people",
          "a crowd", "a couple", "a family", "a soldier", "a doctor", "a chef", "a firefighter", "a police officer",
          "a farmer", "a dancer", "a musician", "an athlete", "a student", "a worker", "a clown", "a bride",
          "a fisherman"]
ACTIONS = ["running", "walking", "jumping", "swimming", "dancing", "sleeping", "eating", "drinking", "cooking",
           "reading", "writing", "painting", "singing", "laughing", "crying", "smiling", "waving", "climbing",
           "riding a bicycle", "playing football", "playing guitar", "taking a photo", "talking on the phone",
           "holding an umbrella", "carrying a bag", "sitting on a bench", "standing in line", "shaking hands",
           "hugging", "fishing"]
BODY = ["face", "eyes", "mouth", "nose", "ear", "hair", "beard", "hand", "fingers", "arm", "leg", "foot", "shoulder",
        "back", "skin", "teeth", "lips", "tattooed arm", "wrinkled hands", "curly hair"]
COUNTS = ["one", "two", "three", "four", "five", "a pair of", "a few", "several", "many", "a row of",
          "a pile of", "a group of", "a crowd of", "a stack of", "hundreds of"]
PLURAL_EXCEPTIONS = {"sheep": "sheep", "deer": "deer", "goldfish": "goldfish", "mouse": "mice", "wolf": "wolves",
                     "leaf": "leaves", "knife": "knives", "bus": "buses", "fox": "foxes", "box": "boxes",
                     "glass of wine": "glasses of wine", "cup of coffee": "cups of coffee", "cup of tea": "cups of tea",
                     "bowl of soup": "bowls of soup", "plate of pasta": "plates of pasta", "loaf of bread": "loaves of bread",
                     "tomato": "tomatoes", "volcano": "volcanoes", "cactus": "cacti", "church": "churches",
                     "bench": "benches", "sandwich": "sandwiches", "watch": "watches", "wristwatch": "wristwatches",
                     "strawberry": "strawberries", "butterfly": "butterflies", "puppy": "puppies",
                     "pair of scissors": "pairs of scissors", "pair of shoes": "pairs of shoes",
                     "pair of boots": "pairs of boots", "pair of gloves": "pairs of gloves",
                     "pair of sunglasses": "pairs of sunglasses", "pair of skis": "pairs of skis",
                     "field of grass": "fields of grass", "ice cream cone": "ice cream cones",
                     "hot air balloon": "hot air balloons", "chess board": "chess boards", "dress": "dresses",
                     "bee": "bees", "jellyfish": "jellyfish", "octopus": "octopuses", "sushi": "pieces of sushi",
                     "broccoli": "heads of broccoli", "cheese": "pieces of cheese", "key": "keys",
                     "game controller": "game controllers", "light bulb": "light bulbs", "bookshelf": "bookshelves",
                     "lighthouse": "lighthouses", "sand dune": "sand dunes", "swimming pool": "swimming pools",
                     "traffic light": "traffic lights", "road sign": "road signs", "street lamp": "street lamps",
                     "parking lot": "parking lots", "sneakers": "pairs of sneakers", "computer mouse": "computer mice",
                     "computer keyboard": "computer keyboards", "glass": "glasses", "waterfall": "waterfalls"}
ABSTRACT = [
    "vibrant colors", "muted colors", "pastel colors", "high contrast", "low contrast", "warm tones", "cool tones",
    "monochrome", "symmetry", "repetition", "a busy composition", "minimalism", "negative space", "motion blur",
    "shallow depth of field", "a sharp focus", "lens flare", "harsh shadows", "soft shadows", "reflections",
    "a bird's eye view", "a worm's eye view", "a wide angle view", "a side view", "a front view", "a view from behind",
    "a crowded scene", "an empty scene", "a peaceful mood", "a scary mood", "a festive atmosphere", "a sad mood",
    "a romantic mood", "a mysterious atmosphere", "chaos", "order", "speed", "stillness", "luxury", "poverty",
    "text written on a sign", "handwritten text", "numbers", "a barcode", "a watermark", "a frame", "a border",
    "a close-up of a surface", "a pattern of tiles", "a texture of fabric", "a texture of wood grain",
    "a texture of stone", "a texture of sand", "a texture of water ripples", "a texture of leaves", "bubbles",
    "smoke", "fire", "sparks", "dust", "ice crystals", "steam", "shadows on a wall", "stars in the sky",
    "the moon", "the sun", "clouds at sunset", "lightning", "fireworks", "a rainbow over hills", "the horizon",
]


def _plural(noun: str) -> str:
    if noun in PLURAL_EXCEPTIONS:
        return PLURAL_EXCEPTIONS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def build_pool(size: int = 3500, seed: int = 0) -> list:
    """The pool as a list of ``size`` unique descriptions (deterministic for a given seed)."""
    rng = random.Random(seed)
    objects = [o for group in sorted(OBJECTS) for o in OBJECTS[group]]
    pool: list = []

    def add(s):
        s = _cap(s)
        if s not in seen:
            seen.add(s)
            pool.append(s)

    seen: set = set()
    # 1. every object, scene, style, body part and abstract concept on its own
    for o in objects:
        add(f"photo of {_article(o)}")
    for s in SCENES:
        add("an underwater scene" if s == "underwater" else f"photo of {s}")
    for st in STYLES:
        add(st)
    for b in BODY:
        add(f"close-up of a person's {b}")
    for a in ABSTRACT:
        add(f"image with {a}")
    for p in PEOPLE:
        add(f"photo of {p}")
    # 2. the property vocabularies on their own
    for c in COLORS:
        add(f"{c} color" if c not in ("colorful", "multicolored", "dark", "pale", "bright") else f"{c} colors")
    for t in TEXTURES:
        add(f"{t} texture")
    for p in PATTERNS:
        add(f"{p} pattern")
    for m in MATERIALS:
        add(f"{m} object")
    for s in SIZES:
        add(f"{s} shape" if s in ("round", "square", "triangular", "rectangular", "circular", "curved",
                                  "pointed", "flat", "octagonal") else f"{s} object")
    for light in LIGHT:
        add(f"photo taken {light}")
    # 3. compositions, sampled without replacement from the full products
    combos = []
    for o in objects:
        for c in COLORS:
            combos.append(f"{_article(c)} {o}")
        for t in TEXTURES:
            combos.append(f"{_article(t)} {o}")
        for p in PATTERNS:
            combos.append(f"{_article(p)} {o}")
        for m in MATERIALS:
            combos.append(f"{_article(m)} {o}")
        for s in SIZES + STATES:
            combos.append(f"{_article(s)} {o}")
        for sc in SCENES:
            combos.append(f"{_article(o)} underwater" if sc == "underwater" else f"{_article(o)} in {sc}")
        for light in LIGHT:
            combos.append(f"{_article(o)} {light}")
        for st in STYLES:
            combos.append(f"{st} of {_article(o)}")
        for n in COUNTS:
            combos.append(f"{n} {_plural(o)}")
    for p in PEOPLE:
        for a in ACTIONS:
            combos.append(f"{p} {a}")
        for sc in SCENES:
            combos.append(f"{p} underwater" if sc == "underwater" else f"{p} in {sc}")
    for sc in SCENES:
        for light in LIGHT:
            combos.append(f"{'an underwater scene' if sc == 'underwater' else sc} {light}")
        for st in STYLES:
            combos.append(f"{st} of {sc}")
    combos.sort()
    rng.shuffle(combos)
    for c in combos:
        if len(pool) >= size:
            break
        add(c)
    return pool[:size]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("textpool.txt"))
    ap.add_argument("--size", type=int, default=3500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    pool = build_pool(args.size, args.seed)
    header = [
        "# vitdecomp default TextSpan pool: short image descriptions, one per line.",
        "# Generated by make_textpool.py (deterministic; edit the word lists there, not this file). MIT licence.",
    ]
    args.out.write_text("\n".join(header + pool) + "\n", encoding="utf-8")
    print(f"wrote {len(pool)} descriptions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
