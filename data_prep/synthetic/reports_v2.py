"""Cohort version 2's clinical text: the same findings as version 1, worded as different readers write them.

Version 1's reports are the zero-shot prompts' own sentences, so zero-shot scores on it only show that the
pipeline runs. Here each study gets a reader (a house style: case, section headings or prose, terse or
wordy), each finding one of several phrasings in one of several sentence frames, the findings in a
varying order with varying filler, and never one of the paper's prompt sentences (tests check that after
clean_text). The clinical terms stay: pacemaker / pacer lead, TAVR / transcatheter aortic valve,
MitraClip / mitral clip, ejection fraction / EF / LVEF, mildly / moderately / severely dilated.

What a report says is the truth: the EF (always, as an integer percent), the LV size (always), the
systolic grade (half of the reports, as in version 1), each device present (its count for clips), and two
statements drawn per report and kept in truth.csv: no significant valve disease (only without TAVR or
MitraClip) and normal LV wall thickness. The label phrases of echoclip_jax/config/zero_shot_tasks.json
("report_phrases") cover every phrasing here, so `task_table.task_labels` reads these reports' labels.
"""

from __future__ import annotations

import numpy as np

from data_prep.synthetic.cohort import LV_SIZES

_EF = (
    "The ejection fraction is estimated at {ef}%.",
    "LVEF {ef}%.",
    "Left ventricular ejection fraction of {ef}%.",
    "EF approximately {ef} %.",
    "LV ejection fraction measures {ef}%.",
    "The LV ejection fraction was calculated at {ef}% (biplane method of discs).",
)
_SIZE_NORMAL = (
    "The left ventricle is normal in size.",
    "Normal LV cavity size.",
    "LV size is normal.",
    "Left ventricular cavity size is within normal limits.",
)
_SIZE_DILATED = (
    "The left ventricle is {adv} dilated.",
    "{Adv} dilated LV cavity.",
    "LV cavity size is {adv} increased.",
    "{Sev} LV dilatation.",
    "The LV is {adv} enlarged.",
)
_GRADE = {
    "hyperdynamic": ("Hyperdynamic LV systolic function.", "Left ventricular systolic function is hyperdynamic."),
    "normal": ("Left ventricular systolic function is normal.", "Preserved LV systolic function."),
    "reduced": (
        "{Adv} reduced LV systolic function.",
        "Left ventricular systolic function is {adv} depressed.",
        "{Sev} global LV systolic dysfunction.",
    ),
}
# Devices: noun phrases (the label phrase is the part after the article) in sentence frames.
_PACER = (
    "a pacemaker lead in the right ventricle",
    "a pacer lead in the right heart",
    "a pacemaker wire across the tricuspid valve",
)
_TAVR = ("a transcatheter aortic valve prosthesis", "a well-seated TAVR valve", "a TAVR valve in good position")
_CLIPS = {
    1: (
        "a single MitraClip on the mitral leaflets",
        "one mitral clip in stable position",
        "one MitraClip device bridging the mitral leaflets",
    ),
    2: (
        "two MitraClips on the mitral leaflets",
        "two mitral clips in stable position",
        "two MitraClip devices bridging the mitral leaflets",
    ),
}
_FRAMES = ("There is {np}.", "Note is made of {np}.", "{NP}.", "{NP} is again seen.")
_NO_VALVE = (
    "No significant valvular disease.",
    "The valves are structurally normal without significant stenosis or regurgitation.",
    "No hemodynamically significant valve disease.",
)
_WALL = (
    "LV wall thickness is normal.",
    "Left ventricular wall thickness is within normal limits.",
    "Normal LV wall thickness.",
)
_RHYTHM = {
    "SINUS BRADYCARDIA": ("Sinus bradycardia.", "The rhythm is sinus bradycardia."),
    "SINUS TACHYCARDIA": ("Sinus tachycardia during the study.", "The rhythm is sinus tachycardia."),
    "NORMAL SINUS RHYTHM": ("Sinus rhythm.", "The rhythm is normal sinus."),
}
_FILLER = (
    ("No pericardial effusion.", "There is no pericardial effusion."),
    ("Right ventricular size and function are normal.", "Normal RV size and systolic function."),
    ("The atria are normal in size.", "Left atrium is normal in size."),
    ("The tricuspid valve appears normal.",),
    ("The aortic root is normal in size.",),
    ("No intracardiac thrombus is seen.",),
    ("IVC is normal in caliber.",),
)
_QUALITY = ("Technically adequate study.", "Image quality is fair.", "Adequate acoustic windows.", "")
# Readers: (upper case?, section headings?, terse? (fewer filler sentences), leads with the impression?)
READERS = (
    (True, False, False, False),
    (False, True, False, False),
    (False, False, True, False),
    (True, True, False, True),
    (False, False, False, True),
)
_ADV = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
_HEAD = ("LEFT VENTRICLE:", "DEVICES:", "VALVES:", "OTHER:", "IMPRESSION:")


def _grade(ef: int) -> tuple[str, str | None]:
    """(systolic band, severity) with version 1's thresholds (reports.systolic_function)."""
    if ef >= 70:
        return "hyperdynamic", None
    if ef >= 55:
        return "normal", None
    return "reduced", "mild" if ef >= 45 else "moderate" if ef >= 30 else "severe"


def _fill(template: str, sev: str | None = None, **kw) -> str:
    if sev:
        kw.update(adv=_ADV[sev], Adv=_ADV[sev].capitalize(), Sev=sev.capitalize())
    return template.format(**kw)


def _device(rng, phrases) -> str:
    np_ = phrases[int(rng.integers(len(phrases)))]
    frame = _FRAMES[int(rng.integers(len(_FRAMES)))]
    bare = np_.split(" ", 1)[1] if np_.startswith("a ") else np_
    return frame.format(np=np_, NP=bare[0].upper() + bare[1:])


def clinical_report_v2(study: dict) -> tuple[str, dict[str, int]]:
    """(the clinical text, {statement: 0/1} of what it states besides the study's truth:
    no_valvular_heart_disease, normal_wall_thickness); deterministic for the study."""
    rng = np.random.default_rng(list(study["report_seed"]) + [17])
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    upper, headed, terse, impression_first = READERS[int(rng.integers(len(READERS)))]
    ef, size, devices = study["ef"], study["lv_size"], set(study["devices"])
    assert size in LV_SIZES
    lv = [pick(_EF).format(ef=ef), pick(_SIZE_NORMAL) if size == "normal" else _fill(pick(_SIZE_DILATED), size)]
    band, sev = _grade(ef)
    if rng.random() < 0.5:
        lv.append(_fill(pick(_GRADE[band]), sev))
    states = {"no_valvular_heart_disease": 0, "normal_wall_thickness": int(rng.random() < 0.5)}
    if states["normal_wall_thickness"]:
        lv.append(pick(_WALL))
    lv = [lv[i] for i in rng.permutation(len(lv))]
    device = []
    if "pacemaker" in devices:
        device.append(_device(rng, _PACER))
    if "tavr" in devices:
        device.append(_device(rng, _TAVR))
    if study["n_mitraclips"]:
        device.append(_device(rng, _CLIPS[study["n_mitraclips"]]))
    valves = []
    if not devices & {"tavr", "mitraclip"} and rng.random() < 0.5:
        states["no_valvular_heart_disease"] = 1
        valves.append(pick(_NO_VALVE))
    hr = study["heart_rate"]
    rhythm = "SINUS BRADYCARDIA" if hr < 60 else "SINUS TACHYCARDIA" if hr > 100 else "NORMAL SINUS RHYTHM"
    other = [pick(_RHYTHM[rhythm])] + [pick(f) for f in _FILLER if rng.random() < (0.25 if terse else 0.55)]
    other = [other[i] for i in rng.permutation(len(other))] + [pick(_QUALITY)]
    sections = list(zip(_HEAD[:4], (lv, device, valves, other)))
    if impression_first:  # the impression restates the EF first, as many readers do
        restated = pick(("LVEF {ef}%.", "EF {ef}%.", "Ejection fraction of {ef}%.")).format(ef=ef)
        sections.insert(0, (_HEAD[4], [restated]))
    parts = []
    for heading, sentences in sections:
        if not sentences:
            continue
        if headed or heading == _HEAD[4]:
            sentences = [f"{heading if upper else heading.capitalize()} {sentences[0]}", *sentences[1:]]
        parts.extend(s for s in sentences if s)
    text = " ".join(parts)
    return (text.upper() if upper else text), states
