"""What the GLM intent model answers, how it is prompted, and the synthetic data it learns from.

The plugin imports this module at run time, so it uses the standard library only.

Intents (:data:`INTENT_SCHEMA`): a drink ``order``, a ``device`` command, or ``unknown`` for
text that is neither. Slots the text does not state take fixed defaults (:data:`ORDER_DEFAULTS`;
orange juice is iced unless said otherwise), so every text has exactly one right answer. A device
command that names no zone is ``unknown``: the gateway must never guess which zone to actuate.

The prompt contract (the plugin relies on it token for token): the token ids of one example are
``encode(prefix_text(system)) + encode(request_text(text)) + encode(canonical(intent)) + [eos]``,
each part encoded on its own without added special tokens. The plugin prefills the first part once
and appends the second per request; the model then writes the third and ``<|end|>``.

:func:`examples` draws (text, intent) pairs in Chinese and English from many templates. A text's
split is decided by a hash of its normalised form (case, spaces and punctuation ignored), so the
``heldout`` split never shares a text with ``train``, not even up to punctuation or case.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, Final

Intent = dict[str, Any]

ITEMS: Final = (
    "americano", "latte", "cappuccino", "espresso", "mocha",
    "flat_white", "green_tea", "black_tea", "hot_chocolate", "orange_juice",
)  # fmt: skip
SIZES: Final = ("small", "medium", "large")
SUGARS: Final = ("none", "less", "normal", "extra")
MILKS: Final = ("none", "whole", "oat", "soy", "skim")
TEMPERATURES: Final = ("hot", "iced")
DEVICES: Final = ("pump", "valve", "fan", "light", "heater", "compressor", "conveyor", "door")
ACTIONS: Final = ("on", "off", "open", "close", "start", "stop")
#: Devices that open and close; all others switch on/off and start/stop.
OPENABLE: Final = ("valve", "door")
MAX_QUANTITY: Final = 5
MAX_ZONE: Final = 12
ORDER_DEFAULTS: Final[Intent] = {"size": "medium", "quantity": 1, "sugar": "normal", "milk": "none",
                                 "temperature": "hot"}  # fmt: skip
#: Items whose unsaid temperature is not the default one.
DEFAULT_TEMPERATURE: Final = {"orange_juice": "iced"}

EOS: Final = "<|end|>"
USER: Final = "<|user|>"
ASSISTANT: Final = "<|assistant|>"
PAD: Final = "<|pad|>"
SPECIAL_TOKENS: Final = (PAD, USER, ASSISTANT, EOS)

INTENT_SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "gatewayd GLM intent",
    "type": "object",
    "required": ["intent"],
    "properties": {"intent": {"enum": ["order", "device", "unknown"]}},
    "oneOf": [
        {
            "title": "order",
            "type": "object",
            "properties": {
                "intent": {"const": "order"},
                "item": {"enum": list(ITEMS)},
                "size": {"enum": list(SIZES)},
                "quantity": {"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY},
                "sugar": {"enum": list(SUGARS)},
                "milk": {"enum": list(MILKS)},
                "temperature": {"enum": list(TEMPERATURES)},
            },
            "required": ["intent", "item", "size", "quantity", "sugar", "milk", "temperature"],
            "additionalProperties": False,
        },
        {
            "title": "device",
            "type": "object",
            "properties": {
                "intent": {"const": "device"},
                "device": {"enum": list(DEVICES)},
                "action": {"enum": list(ACTIONS)},
                "zone": {"type": "integer", "minimum": 1, "maximum": MAX_ZONE},
            },
            "required": ["intent", "device", "action", "zone"],
            "additionalProperties": False,
            # A valve or a door opens and closes; the rest switch on/off or start/stop.
            "if": {"properties": {"device": {"enum": list(OPENABLE)}}},
            "then": {"properties": {"action": {"enum": ["open", "close"]}}},
            "else": {"properties": {"action": {"enum": ["on", "off", "start", "stop"]}}},
        },
        {
            "title": "unknown",
            "type": "object",
            "properties": {"intent": {"const": "unknown"}},
            "required": ["intent"],
            "additionalProperties": False,
        },
    ],
}

SYSTEM_PROMPT: Final = (
    "You turn one short text, Chinese or English, into one JSON object on one line: keys sorted, "
    "no spaces, nothing else.\n"
    'Drink order: {"intent":"order"} with item (americano, latte, cappuccino, espresso, mocha, '
    "flat_white, green_tea, black_tea, hot_chocolate, orange_juice), size (small, medium, large), "
    "quantity (1 to 5), sugar (none, less, normal, extra), milk (none, whole, oat, soy, skim), "
    "temperature (hot, iced). If unsaid: size medium, quantity 1, sugar normal, milk none, "
    "temperature hot (orange juice iced).\n"
    'Device command: {"intent":"device"} with device (pump, valve, fan, light, heater, compressor, '
    "conveyor, door), action (on, off, open, close, start, stop), zone (1 to 12). A number after the "
    "device is its zone.\n"
    'Anything else, or a command without a zone: {"intent":"unknown"}.'
)
STRICT_PROMPT: Final = (
    "Your last answer was not valid. Answer with only one JSON object, keys sorted, no spaces: "
    'an order, a device command or {"intent":"unknown"}.'
)


def canonical(intent: Intent) -> str:
    """The exact text the model is trained to emit for ``intent``."""
    return json.dumps(intent, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def prefix_text(system: str) -> str:
    """The shared prefix of every request under ``system`` (prefilled once, then reused)."""
    return system + "\n" + USER + "\n"


def request_text(text: str) -> str:
    """The per-request part after the prefix; the model's answer follows it."""
    return text + "\n" + ASSISTANT + "\n"


def order(item: str, **slots: Any) -> Intent:
    """An order intent with unsaid slots at their defaults."""
    full = {**ORDER_DEFAULTS, "temperature": DEFAULT_TEMPERATURE.get(item, "hot"), **slots}
    return {"intent": "order", "item": item, **full}


def device(name: str, action: str, zone: int) -> Intent:
    return {"intent": "device", "device": name, "action": action, "zone": zone}


UNKNOWN: Final[Intent] = {"intent": "unknown"}

# --- phrasing ------------------------------------------------------------------------------------

EN_NUMBERS: Final = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                     "ten", "eleven", "twelve")  # fmt: skip
ZH_NUMBERS: Final = ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二")

EN_ITEMS: Final = {
    "americano": ["americano", "caffe americano", "americano coffee"],
    "latte": ["latte", "caffe latte", "café latte"],
    "cappuccino": ["cappuccino", "cappucino"],
    "espresso": ["espresso", "espresso shot"],
    "mocha": ["mocha", "cafe mocha", "mocha coffee"],
    "flat_white": ["flat white"],
    "green_tea": ["green tea"],
    "black_tea": ["black tea"],
    "hot_chocolate": ["hot chocolate", "hot cocoa", "cocoa"],
    "orange_juice": ["orange juice", "OJ", "fresh orange juice"],
}
ZH_ITEMS: Final = {
    "americano": ["美式", "美式咖啡", "冰美式"],
    "latte": ["拿铁", "拿铁咖啡"],
    "cappuccino": ["卡布奇诺", "卡布"],
    "espresso": ["浓缩咖啡", "意式浓缩", "浓缩"],
    "mocha": ["摩卡", "摩卡咖啡"],
    "flat_white": ["澳白", "馥芮白"],
    "green_tea": ["绿茶"],
    "black_tea": ["红茶"],
    "hot_chocolate": ["热巧克力", "热可可"],
    "orange_juice": ["橙汁", "鲜榨橙汁"],
}
EN_SIZE_PRE: Final = {"small": ["small"], "medium": ["medium", "regular"], "large": ["large", "big"]}
EN_SIZE_POST: Final = {
    "small": ["size small", "small size", "make it small", "in small"],
    "medium": ["size medium", "medium size", "make it medium", "in medium"],
    "large": ["size large", "large size", "make it large", "in large", "make it a large"],
}
EN_TEMP_PRE: Final = {"hot": ["hot", "warm"], "iced": ["iced", "cold"]}
EN_TEMP_POST: Final = {
    "hot": ["hot", "served hot", "hot please"],
    "iced": ["iced", "on ice", "over ice", "with ice"],
}
EN_MILK_PRE: Final = {"whole": ["whole milk"], "oat": ["oat", "oat milk"], "soy": ["soy", "soy milk"],
                      "skim": ["skim", "skinny"]}  # fmt: skip
EN_MILK_POST: Final = {
    "none": ["no milk", "without milk", "hold the milk"],
    "whole": ["with whole milk", "whole milk", "full fat milk"],
    "oat": ["with oat milk", "oat milk", "with oatmilk"],
    "soy": ["with soy milk", "soy milk", "with soya milk"],
    "skim": ["with skim milk", "skim milk", "with skimmed milk", "nonfat milk"],
}
EN_SUGAR_POST: Final = {
    "none": ["no sugar", "without sugar", "sugar free", "unsweetened", "zero sugar"],
    "less": ["less sugar", "light sugar", "half sugar", "a little sugar", "less sweet"],
    "normal": ["normal sugar", "regular sugar", "standard sugar", "normal sweetness"],
    "extra": ["extra sugar", "extra sweet", "more sugar", "double sugar", "lots of sugar"],
}
EN_ORDER_LEAD: Final = ("", "", "", "I'd like ", "I want ", "can I get ", "could I have ", "give me ",
                        "order ", "please get me ", "I'll have ", "let me get ", "can I have ", "get me ",
                        "i would like ", "one order: ", "hi, ")  # fmt: skip
EN_ORDER_TAIL: Final = ("", "", "", " please", ", please", " thanks", ", thank you", " to go", " asap")

ZH_SIZE: Final = {
    "small": ["小杯", "小杯的"],
    "medium": ["中杯", "中杯的"],
    "large": ["大杯", "大杯的", "超大杯"],
}
ZH_TEMP_PRE: Final = {"hot": ["热", "热的"], "iced": ["冰", "冰的"]}
ZH_TEMP_POST: Final = {"hot": ["热的", "要热的", "做热的"], "iced": ["冰的", "要冰的", "加冰", "做冰的"]}
ZH_MILK: Final = {
    "none": ["不加奶", "不要奶", "无奶"],
    "whole": ["全脂奶", "全脂牛奶", "加全脂奶"],
    "oat": ["燕麦奶", "换燕麦奶", "加燕麦奶", "用燕麦奶"],
    "soy": ["豆奶", "换豆奶", "加豆奶", "用豆奶"],
    "skim": ["脱脂奶", "换脱脂奶", "脱脂牛奶"],
}
ZH_SUGAR: Final = {
    "none": ["无糖", "不加糖", "不要糖", "去糖"],
    "less": ["少糖", "半糖", "微糖", "少放糖"],
    "normal": ["正常糖", "标准糖", "正常甜"],
    "extra": ["多糖", "多加糖", "多放糖", "加多点糖"],
}
ZH_ORDER_LEAD: Final = ("", "", "我要", "我想要", "来", "给我来", "帮我点", "请给我", "麻烦来", "点", "要",
                        "我点", "给我", "帮我来")  # fmt: skip
ZH_ORDER_TAIL: Final = ("", "", "", "，谢谢", "。", "！", "吧", "，谢谢！", "，麻烦了", "，打包")
ZH_SEPS: Final = ("，", "，", ",", " ", "、", "")

EN_DEVICES: Final = {
    "pump": ["pump", "water pump"], "valve": ["valve"], "fan": ["fan", "exhaust fan"],
    "light": ["light", "lights", "lamp"], "heater": ["heater"], "compressor": ["compressor"],
    "conveyor": ["conveyor", "conveyor belt"], "door": ["door"],
}  # fmt: skip
ZH_DEVICES: Final = {
    "pump": ["水泵", "泵"], "valve": ["阀门", "阀"], "fan": ["风扇", "风机"], "light": ["灯", "照明灯"],
    "heater": ["加热器"], "compressor": ["压缩机"], "conveyor": ["传送带", "输送带"], "door": ["门", "大门"],
}  # fmt: skip
#: English verb phrases; ``{d}`` is the device phrase.
EN_VERBS: Final = {
    "on": ["turn on {d}", "switch on {d}", "power on {d}", "{d} on", "turn {d} on", "switch {d} on"],
    "off": ["turn off {d}", "switch off {d}", "power off {d}", "shut off {d}", "{d} off", "turn {d} off",
            "switch {d} off", "kill {d}"],
    "open": ["open {d}", "{d} open", "open up {d}"],
    "close": ["close {d}", "shut {d}", "{d} close", "close off {d}"],
    "start": ["start {d}", "start up {d}", "fire up {d}", "{d} start", "run {d}"],
    "stop": ["stop {d}", "halt {d}", "{d} stop", "stop {d} now"],
}  # fmt: skip
ZH_VERBS: Final = {
    "on": ["打开", "开启", "开"], "off": ["关闭", "关掉", "关"], "open": ["打开", "开启", "开"],
    "close": ["关闭", "关上", "关"], "start": ["启动", "运行"], "stop": ["停止", "停掉", "停"],
}  # fmt: skip
#: Chinese verbs after the object ("把…关掉").
ZH_VERBS_POST: Final = {
    "on": ["打开", "开起来", "开一下"], "off": ["关掉", "关了", "关闭"], "open": ["打开", "开一下"],
    "close": ["关上", "关了", "关闭"], "start": ["启动", "启动一下"], "stop": ["停掉", "停了", "停下"],
}  # fmt: skip
EN_DEVICE_LEAD: Final = ("", "", "", "please ", "can you ", "hey, ", "now ", "go ahead and ",
                         "I need you to ", "operator: ")  # fmt: skip
EN_DEVICE_TAIL: Final = ("", "", "", " please", " now", " right away", ", thanks", " immediately")
ZH_DEVICE_LEAD: Final = ("", "", "请", "帮我", "麻烦", "马上", "现在")
ZH_DEVICE_TAIL: Final = ("", "", "。", "！", "吧", "，谢谢", "一下")

EN_CHAT: Final = (
    "hello", "hi there", "good morning", "how are you", "what's the weather like today", "tell me a joke",
    "what time is it", "who are you", "thanks", "thank you so much", "never mind", "cancel that",
    "what can you do", "is the shop open", "where is the restroom", "how much is a latte",
    "do you have wifi", "I love this place", "what is the meaning of life", "sing me a song",
    "good night", "see you tomorrow", "how do I reset my password", "the weather is nice",
    "what's on the menu", "can you help me", "is zone 3 safe", "how hot is the heater",
    "what does the pump do", "why is the light blinking", "my coffee was cold yesterday",
    "I don't like tea", "are you a robot", "play some music", "book a table for two",
    "what's the status of the conveyor", "who turned off the fan", "ok", "yes", "no", "test",
)  # fmt: skip
ZH_CHAT: Final = (
    "你好", "早上好", "今天天气怎么样", "讲个笑话", "现在几点了", "你是谁", "谢谢", "算了", "取消",
    "你能做什么", "店里开门了吗", "洗手间在哪里", "拿铁多少钱", "有无线网吗", "我很喜欢这里",
    "晚安", "明天见", "怎么重置密码", "今天天气不错", "菜单上有什么", "能帮我一下吗", "3区安全吗",
    "水泵是干什么的", "为什么灯一直在闪", "昨天的咖啡是凉的", "我不喜欢喝茶", "你是机器人吗",
    "放首歌", "订一张两人桌", "传送带现在什么状态", "谁把风扇关了", "好的", "是的", "不是", "测试",
    "在吗", "辛苦了", "随便看看",
)  # fmt: skip
EN_OFF_MENU: Final = ("pizza", "beer", "burger", "sandwich", "glass of wine", "bagel", "croissant",
                      "milkshake", "bubble tea", "hot dog", "salad", "smoothie")  # fmt: skip
ZH_OFF_MENU: Final = ("披萨", "啤酒", "汉堡", "三明治", "红酒", "炒饭", "牛角包", "奶昔", "珍珠奶茶", "热狗",
                      "沙拉", "可乐")  # fmt: skip
EN_OTHER_DEVICES: Final = ("TV", "printer", "radio", "window", "elevator", "alarm", "robot arm", "camera")
ZH_OTHER_DEVICES: Final = ("电视", "打印机", "收音机", "窗户", "电梯", "警报", "机械臂", "摄像头")


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _en_quantity(rng: random.Random, q: int) -> str:
    if q == 1:
        return _pick(rng, ("a", "a", "one", "1", ""))
    return _pick(rng, (EN_NUMBERS[q], EN_NUMBERS[q], str(q)))


def _plural(noun: str) -> str:
    return noun if noun.endswith("s") else noun + "s"


def _article(next_word: str) -> str:
    return "an" if next_word[:1].lower() in "aeiou" else "a"


def _en_order(rng: random.Random) -> tuple[str, Intent]:
    item = _pick(rng, ITEMS)
    slots = _draw_slots(rng, item)
    q = slots.get("quantity", 1)
    # A stated slot goes before the noun ("a large iced oat latte", adjectives in English order:
    # size, temperature, milk) or after it ("..., no sugar").
    pre: list[str] = []
    post: list[str] = []
    if "size" in slots:
        if rng.random() < 0.7:
            pre.append(_pick(rng, EN_SIZE_PRE[slots["size"]]))
        else:
            post.append(_pick(rng, EN_SIZE_POST[slots["size"]]))
    if "temperature" in slots:
        if rng.random() < 0.6:
            pre.append(_pick(rng, EN_TEMP_PRE[slots["temperature"]]))
        else:
            post.append(_pick(rng, EN_TEMP_POST[slots["temperature"]]))
    if "milk" in slots:
        if slots["milk"] != "none" and rng.random() < 0.4:
            pre.append(_pick(rng, EN_MILK_PRE[slots["milk"]]))
        else:
            post.append(_pick(rng, EN_MILK_POST[slots["milk"]]))
    if "sugar" in slots:
        post.append(_pick(rng, EN_SUGAR_POST[slots["sugar"]]))
    rng.shuffle(post)
    noun = _pick(rng, EN_ITEMS[item])
    if q > 1 and rng.random() < 0.15:  # "latte x2"
        head = " ".join([*pre, noun, _pick(rng, (f"x{q}", f"x {q}", f"times {q}", f"{q}x"))])
    else:
        noun_phrase = " ".join([*pre, noun if q == 1 else _plural(noun)])
        qty = _en_quantity(rng, q)
        if qty == "a":
            qty = _article(noun_phrase)
        head = f"{qty} {noun_phrase}" if qty else noun_phrase
    text = head
    for i, phrase in enumerate(post):
        last = i == len(post) - 1
        text += _pick(rng, (", ", " ", " and ", ", and ") if last and i else (", ", ", ", " ")) + phrase
    text = _pick(rng, EN_ORDER_LEAD) + text + _pick(rng, EN_ORDER_TAIL)
    return _en_case(rng, text), order(item, **slots)


def _draw_slots(rng: random.Random, item: str) -> dict[str, Any]:
    """The slots a text states (possibly at their default values)."""
    slots: dict[str, Any] = {}
    if rng.random() < 0.5:
        slots["size"] = _pick(rng, SIZES)
    if rng.random() < 0.45:
        slots["quantity"] = rng.randint(2, MAX_QUANTITY) if rng.random() < 0.8 else 1
    if rng.random() < 0.45:
        slots["sugar"] = _pick(rng, SUGARS)
    if rng.random() < (0.15 if item in ("orange_juice", "green_tea") else 0.4):
        slots["milk"] = _pick(rng, MILKS)
    # "hot" chocolate and orange juice are not said hot: the name or the default says it already.
    if item not in ("hot_chocolate", "orange_juice") and rng.random() < 0.4:
        slots["temperature"] = _pick(rng, TEMPERATURES)
    elif item != "orange_juice" and rng.random() < 0.15:
        slots["temperature"] = "iced"
    return slots


def _en_case(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.5:
        return text
    if r < 0.85:
        return text[:1].upper() + text[1:]
    if r < 0.95:
        return text.lower()
    return text.upper()


def _zh_order(rng: random.Random) -> tuple[str, Intent]:
    item = _pick(rng, ITEMS)
    slots = _draw_slots(rng, item)
    q = slots.get("quantity", 1)
    names = ZH_ITEMS[item]
    if "temperature" not in slots or slots["temperature"] != "iced":
        names = [n for n in names if not n.startswith("冰")] or names
    noun = _pick(rng, names)
    if rng.random() < 0.08:  # code-mixing: an English drink name in a Chinese order
        noun = _pick(rng, EN_ITEMS[item])
    cup = "杯" if rng.random() < 0.85 else "份"
    if q == 1:
        qty = _pick(rng, (f"一{cup}", f"一{cup}", f"1{cup}", ""))
    else:
        qty = _pick(rng, (f"{'两' if q == 2 else ZH_NUMBERS[q]}{cup}", f"{q}{cup}"))
    pre = ""
    post: list[str] = []
    if "size" in slots:
        if rng.random() < 0.7:
            pre += _pick(rng, ZH_SIZE[slots["size"]])
        else:
            post.append(_pick(rng, ZH_SIZE[slots["size"]]))
    if "temperature" in slots and not noun.startswith("冰"):
        if rng.random() < 0.5:
            pre += _pick(rng, ZH_TEMP_PRE[slots["temperature"]])
        else:
            post.append(_pick(rng, ZH_TEMP_POST[slots["temperature"]]))
    if "milk" in slots:
        post.append(_pick(rng, ZH_MILK[slots["milk"]]))
    if "sugar" in slots:
        post.append(_pick(rng, ZH_SUGAR[slots["sugar"]]))
    rng.shuffle(post)
    sep = _pick(rng, ZH_SEPS)
    if rng.random() < 0.15 and qty:
        # List form: "拿铁，大杯，冰的，两杯"
        parts = [pre + noun, *post, qty]
        text = sep.join(parts)
    else:
        text = sep.join([qty + pre + noun, *post])
    text = _pick(rng, ZH_ORDER_LEAD) + text + _pick(rng, ZH_ORDER_TAIL)
    return text, order(item, **slots)


def _en_zone(rng: random.Random, zone: int) -> str:
    n = EN_NUMBERS[zone] if rng.random() < 0.2 else str(zone)
    return _pick(
        rng, (f"zone {n}", f"zone {n}", f"Zone {n}", f"z{zone}", f"zone #{zone}", f"zone no. {zone}")
    )


def _actions_of(name: str) -> tuple[str, ...]:
    """The actions said to a device: lights and heaters are not "started" in plain speech."""
    if name in OPENABLE:
        return ("open", "close")
    return ("on", "off") if name in ("light", "heater") else ("on", "off", "start", "stop")


def _en_device(rng: random.Random, with_zone: bool = True) -> tuple[str, Intent]:
    name = _pick(rng, DEVICES)
    action = _pick(rng, _actions_of(name))
    zone = rng.randint(1, MAX_ZONE)
    dev = _pick(rng, EN_DEVICES[name])
    verb = _pick(rng, EN_VERBS[action])
    form = rng.randrange(6) if with_zone else 6
    the = _pick(rng, ("the ", "the ", ""))
    if form == 0:
        phrase, zone_part = f"{the}{dev} in {_en_zone(rng, zone)}", ""
    elif form == 1:
        phrase, zone_part = f"{dev} {zone}", ""  # "open valve 7": the number is the zone
    elif form == 2:
        phrase, zone_part = f"{the}{_en_zone(rng, zone)} {dev}", ""
    elif form == 3:
        phrase, zone_part = f"{the}{dev} at {_en_zone(rng, zone)}", ""
    elif form == 4:
        phrase = f"{the}{dev}"
        zone_part = _pick(rng, ("{z}: ", "in {z}, ", "{z} - ")).format(z=_en_zone(rng, zone))
    elif form == 5:
        phrase = f"{the}{dev}"
        zone_part = _pick(rng, (", {z}", " in {z}", " ({z})", " for {z}")).format(z=_en_zone(rng, zone))
    else:
        phrase, zone_part = f"{the}{dev}", ""
    body = verb.format(d=phrase)
    if form == 4:
        body = zone_part + body
    elif form == 5:
        body += zone_part
    # "please, the fan off" reads well; "go ahead and the fan off" does not.
    lead = _pick(rng, ("", "", "please, ")) if verb.startswith("{d}") else _pick(rng, EN_DEVICE_LEAD)
    text = lead + body + _pick(rng, EN_DEVICE_TAIL)
    return _en_case(rng, text.strip()), (device(name, action, zone) if with_zone else UNKNOWN)


def _zh_zone(rng: random.Random, zone: int) -> str:
    n = ZH_NUMBERS[zone] if rng.random() < 0.35 else str(zone)
    return _pick(rng, (f"{n}区", f"{n}区", f"{n}号区", f"{n}号区域", f"第{n}区", f"区域{n}", f"{n}号车间"))


def _zh_device(rng: random.Random, with_zone: bool = True) -> tuple[str, Intent]:
    name = _pick(rng, DEVICES)
    action = _pick(rng, _actions_of(name))
    zone = rng.randint(1, MAX_ZONE)
    dev = _pick(rng, ZH_DEVICES[name])
    z = _zh_zone(rng, zone) if with_zone else ""
    de = _pick(rng, ("的", "的", "")) if with_zone else ""
    form = rng.randrange(5)
    if form == 0:
        body = _pick(rng, ZH_VERBS[action]) + z + de + dev
    elif form == 1:
        body = "把" + z + de + dev + _pick(rng, ZH_VERBS_POST[action])
    elif form == 2:
        body = z + de + dev + _pick(rng, ZH_VERBS_POST[action])
    elif form == 3 and with_zone:
        n = str(zone) if rng.random() < 0.6 else ZH_NUMBERS[zone]
        num_dev = f"{n}号{dev}"  # "7号阀门": the device's number is its zone
        body = (
            (_pick(rng, ZH_VERBS[action]) + num_dev)
            if rng.random() < 0.5
            else (num_dev + _pick(rng, ZH_VERBS_POST[action]))
        )
    else:
        body = (z + "，" if z else "") + _pick(rng, ZH_VERBS[action]) + dev
    tail = _pick(rng, ZH_DEVICE_TAIL)
    text = _pick(rng, ZH_DEVICE_LEAD) + body + ("" if body.endswith("一下") and tail == "一下" else tail)
    return text, (device(name, action, zone) if with_zone else UNKNOWN)


def _unknown(rng: random.Random) -> tuple[str, Intent]:
    r = rng.random()
    if r < 0.22:
        text = _pick(rng, EN_CHAT)
        text = (
            _pick(rng, ("", "", "hey ", "um, ", "so "))
            + text
            + _pick(rng, ("", "", "?", "!", ".", " please"))
        )
        text = _en_case(rng, text)
    elif r < 0.42:
        text = (
            _pick(rng, ("", "", "喂，", "嗯，", "请问"))
            + _pick(rng, ZH_CHAT)
            + _pick(rng, ("", "", "？", "！", "。", "呀"))
        )
    elif r < 0.52:
        q = rng.randint(1, MAX_QUANTITY)
        food = _pick(rng, EN_OFF_MENU)
        qty = _en_quantity(rng, q) if q == 1 else EN_NUMBERS[q]
        qty = _article(food) if qty == "a" else qty
        text = _pick(rng, EN_ORDER_LEAD) + (qty + " " if qty else "") + (food if q == 1 else _plural(food))
        text = _en_case(rng, text + _pick(rng, EN_ORDER_TAIL))
    elif r < 0.62:
        food = _pick(rng, ZH_OFF_MENU)
        text = (
            _pick(rng, ZH_ORDER_LEAD)
            + _pick(rng, ("一份", "一杯", "两份", "一个", ""))
            + food
            + _pick(rng, ZH_ORDER_TAIL)
        )
    elif r < 0.70:
        dev, zone = _pick(rng, EN_OTHER_DEVICES), rng.randint(1, MAX_ZONE)
        verb = _pick(rng, ("turn on {d}", "turn off {d}", "open {d}", "close {d}", "start {d}", "stop {d}"))
        text = _en_case(rng, verb.format(d=f"the {dev} in {_en_zone(rng, zone)}"))
    elif r < 0.76:
        dev, zone = _pick(rng, ZH_OTHER_DEVICES), rng.randint(1, MAX_ZONE)
        text = _pick(rng, ("打开", "关闭", "启动", "停止")) + _zh_zone(rng, zone) + "的" + dev
    elif r < 0.84:
        text = (_en_device if rng.random() < 0.5 else _zh_device)(rng, with_zone=False)[0]
    else:
        text = _gibberish(rng)
    return text, UNKNOWN


def _gibberish(rng: random.Random) -> str:
    r = rng.random()
    n = rng.randint(3, 14)
    if r < 0.4:
        return "".join(rng.choice("asdfghjklqwertyuiopzxcvbnm ") for _ in range(n)).strip() or "xx"
    if r < 0.6:
        return "".join(rng.choice("的一是不了人我在有他这为之大来以个中上们到说") for _ in range(n))
    if r < 0.8:
        return "".join(rng.choice("0123456789#*-+. ") for _ in range(n)).strip() or "0"
    return "".join(rng.choice("?!.,;:~") for _ in range(rng.randint(1, 5)))


_KINDS: Final[tuple[tuple[float, Callable[[random.Random], tuple[str, Intent]]], ...]] = (
    (0.27, _en_order),
    (0.27, _zh_order),
    (0.16, _en_device),
    (0.16, _zh_device),
    (0.14, _unknown),
)


def draw(rng: random.Random) -> tuple[str, Intent]:
    """One random (text, intent) pair of any split."""
    make = rng.choices([m for _, m in _KINDS], [w for w, _ in _KINDS])[0]
    text, intent = make(rng)
    return re.sub(r"\s+", " ", text).strip(), intent


def normalized(text: str) -> str:
    """The form a text's split is decided on: case, spaces and punctuation do not count."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


#: Texts the plugin's tests send (the tests say the model never saw them): always held out.
RESERVED_HELDOUT: Final = frozenset(
    normalized(t) for t in ("我要一杯美式咖啡", "a large americano, no sugar", "关闭3区的水泵", "一杯拿铁")
)
HELDOUT_EVERY: Final = 8  # one normalised text in 8 is held out


def split_of(text: str) -> str:
    key = normalized(text) or text  # punctuation-only text: split on the text itself
    if key in RESERVED_HELDOUT:
        return "heldout"
    digest = hashlib.sha256(key.encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") % HELDOUT_EVERY == 0 else "train"


def examples(split: str, n: int, seed: int) -> list[tuple[str, Intent]]:
    """``n`` (text, intent) pairs of ``split`` ("train" or "heldout"), the same for the same seed.

    Held-out texts are distinct (after normalisation); training texts may repeat, as common short
    orders do in real use.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    rng = random.Random(f"{split}:{seed}")
    out: list[tuple[str, Intent]] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):
        if len(out) >= n:
            break
        text, intent = draw(rng)
        if split_of(text) != split:
            continue
        if split == "heldout":
            key = normalized(text) or text
            if key in seen:
                continue
            seen.add(key)
        out.append((text, intent))
    if len(out) < n:
        raise ValueError(f"could only draw {len(out)} distinct {split} examples, not {n}")
    return out
