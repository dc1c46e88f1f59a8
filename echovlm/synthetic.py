"""Synthetic echo studies: the offline stand-in for the EchoPrime release.

Each study gets a latent clinical state (LVEF, PA systolic pressure, chamber sizes, valve lesions, devices, ...)
drawn with rough real-world correlations: a failing left ventricle dilates, moves poorly, leaks through the
mitral valve and raises left atrial and pulmonary pressures; high pulmonary pressure dilates the right heart,
the tricuspid annulus and the IVC; a TAVR replaces the stenotic native valve. From the state we write

  - a report in the sectioned style (16 sections, one per line, our own wording, several phrasings per finding),
  - the ground-truth labels of the 25 scored traits, as the report states them,
  - study embeddings: a fixed random 2-layer tanh network of the standardised state, mixed with gaussian noise.

`signal` (0..1) sets how much of the embedding's variance comes from the state; at 0 it is pure noise and a
model can learn nothing but the report prior. The network's weights come from a fixed seed, so every synthetic
dataset shares one "encoder" the way real datasets share EchoPrime's; `seed` only draws the studies.

Studies are drawn in chunks of CHUNK, each from its own seeded stream: study i is the same whatever the total,
and `iter_chunks` streams any number of studies in bounded memory.
"""

import math
import random
from dataclasses import dataclass

import numpy as np

from echovlm.vocabulary import SECTIONS, TRAITS

# bump whenever what a given seed produces changes, so prepared datasets are rebuilt rather than reused
GENERATOR_VERSION = 3
CHUNK = 1024
DEFAULT_SIGNAL = 0.15  # a linear probe then gets LVEF R^2 ~0.85 from 2,000 studies: learnable, not trivial
PROJECTION_SEED = 20240917
HIDDEN = 256

# graded findings: 0 none, 1 mild, 2 moderate, 3 severe; a trait is positive from moderate up
GRADED = ["lv_dilation", "la_dilation", "ra_dilation", "rv_dilation", "rv_dysfunction", "root_dilation",
          "aortic_stenosis", "mitral_stenosis", "tricuspid_stenosis", "aortic_regurgitation", "mitral_regurgitation",
          "tricuspid_regurgitation", "pulmonic_regurgitation", "mac", "effusion", "septal_lipoma"]
FLAGS = ["male", "pacemaker", "impella", "tavr", "mitraclip", "bicuspid", "hypokinesis", "la_pressure", "dilated_ivc",
         "tamponade"]
# continuous state with the fixed centre and spread used to standardise it for the embedding network
CONTINUOUS = {"age": (64.0, 15.0), "ef": (54.0, 13.0), "pasp": (33.0, 12.0), "ivc": (1.7, 0.45)}


def _grade(rng, drive):
    """Ordinal grade 0..3 from a logistic latent: P(grade >= g) = sigmoid(drive - 1.6 * (g - 1))."""
    x = drive + rng.logistic(size=np.shape(drive))
    return (x > 0).astype(np.int8) + (x > 1.6) + (x > 3.2)


def _chance(rng, logit):
    return rng.random(np.shape(logit)) < 1.0 / (1.0 + np.exp(-logit))


def sample_states(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draw n latent clinical states (vectorised). Intercepts are tuned so every scored trait is >= ~4% positive."""
    # repeat studies of one patient share sex, age (give or take) and the congenital valve
    per_patient = rng.geometric(0.7, size=n)
    patient = np.repeat(np.arange(n), per_patient)[:n]
    s = {"patient": patient}
    s["male"] = (rng.random(n) < 0.55)[patient]
    s["age"] = np.clip(rng.normal(64, 15, n)[patient] + rng.uniform(0, 3, n), 18, 95)
    s["bicuspid"] = (rng.random(n) < 0.05)[patient]
    age = (s["age"] - 64) / 15

    # left ventricle: normal, mildly reduced or reduced ejection fraction
    group = rng.choice(3, size=n, p=[0.66, 0.17, 0.17])
    ef = np.select([group == 0, group == 1], [rng.normal(61, 4.5, n), rng.normal(46, 4, n)], rng.normal(29, 7, n))
    s["ef"] = np.clip(ef, 10, 75)
    hf = np.clip((55 - s["ef"]) / 20, 0, None)  # 0 when normal, ~1.5 when severely reduced
    s["lv_dilation"] = _grade(rng, -2.5 + 2.4 * hf)
    s["hypokinesis"] = rng.random(n) < np.where(s["ef"] < 50, 0.85, 0.05)
    s["impella"] = (s["ef"] < 35) & (rng.random(n) < 0.3)
    s["pacemaker"] = _chance(rng, -3.0 + 0.6 * age + 0.8 * hf)

    # aortic valve and root; a TAVR replaces the native valve, so it leaves no native stenosis behind
    # (nor in a bicuspid valve here: the report of a TAVR describes the prosthesis, not the native leaflets)
    s["tavr"] = _chance(rng, -3.4 + 1.2 * age) & ~s["impella"] & ~s["bicuspid"]
    s["aortic_stenosis"] = np.where(s["tavr"], 0, _grade(rng, -1.3 + 0.9 * age + 2.0 * s["bicuspid"]))
    s["root_dilation"] = _grade(rng, -1.2 + 1.8 * s["bicuspid"] + 0.5 * s["male"] + 0.3 * age)
    s["aortic_regurgitation"] = _grade(rng, -1.3 + 1.0 * s["bicuspid"] + 0.8 * (s["root_dilation"] >= 2) + 0.2 * age)

    # mitral valve: annular calcification with age, functional regurgitation with a failing ventricle
    s["mac"] = _grade(rng, -0.6 + 1.3 * age)
    s["mitral_stenosis"] = _grade(rng, -1.6 + 1.4 * (s["mac"] >= 2))
    mr = _grade(rng, -0.6 + 1.3 * hf + 0.4 * (s["mac"] >= 2))
    s["mitraclip"] = (mr >= 2) & (s["mitral_stenosis"] < 2) & (rng.random(n) < 0.4)
    # a clip leaves mostly mild residual regurgitation
    residual = rng.choice([1, 2, 3], size=n, p=[0.7, 0.25, 0.05]).astype(np.int8)
    s["mitral_regurgitation"] = np.where(s["mitraclip"], residual, mr)

    # left atrial pressure and size, then the pulmonary circulation they load
    mr_sig, ms_sig = s["mitral_regurgitation"] >= 2, s["mitral_stenosis"] >= 2
    s["la_pressure"] = _chance(rng, -3.0 + 1.6 * hf + 0.7 * mr_sig + 1.0 * ms_sig)
    s["la_dilation"] = _grade(rng, -0.6 + 1.2 * hf + 1.0 * mr_sig + 1.5 * ms_sig + 1.0 * s["la_pressure"] + 0.3 * age)
    lung = rng.random(n) < 0.05  # pulmonary vascular or lung disease, independent of the left heart
    pasp = (24 + 10 * hf + 8 * s["la_pressure"] + 5 * mr_sig + 10 * ms_sig + lung * rng.uniform(15, 45, n)
            + rng.normal(0, 4, n))
    s["pasp"] = np.clip(pasp, 15, 110)
    ph = np.clip((s["pasp"] - 35) / 15, 0, None)

    # right heart follows the pulmonary pressure; pacing leads add tricuspid regurgitation
    s["rv_dilation"] = _grade(rng, -1.6 + 1.4 * ph + 0.5 * hf)
    rv_sig = s["rv_dilation"] >= 2
    s["rv_dysfunction"] = _grade(rng, -1.7 + 1.1 * ph + 0.8 * hf + 0.8 * rv_sig)
    s["tricuspid_regurgitation"] = _grade(rng, -0.8 + 1.1 * ph + 0.9 * s["pacemaker"] + 0.8 * rv_sig)
    s["tricuspid_stenosis"] = _grade(rng, -1.5 + 0.6 * s["pacemaker"] + 0.3 * ph)
    s["pulmonic_regurgitation"] = _grade(rng, -1.5 + 0.8 * ph)
    tr_sig = s["tricuspid_regurgitation"] >= 2
    s["ra_dilation"] = _grade(rng, -1.4 + 1.2 * tr_sig + 0.8 * ph + 0.5 * rv_sig)
    s["dilated_ivc"] = _chance(rng, -3.2 + 1.2 * ph + 1.0 * tr_sig + 1.0 * (s["rv_dysfunction"] >= 2))
    s["ivc"] = np.where(s["dilated_ivc"], rng.uniform(2.1, 2.9, n), rng.uniform(1.1, 1.9, n))

    s["effusion"] = _grade(rng, -0.8 + 0.6 * hf + 0.5 * s["impella"])
    s["tamponade"] = (s["effusion"] == 3) & (rng.random(n) < 0.3)
    s["septal_lipoma"] = _grade(rng, -1.4 + 0.8 * age)
    return s


def labels_from_state(s: dict[str, list], i: int) -> dict[str, int]:
    """The 23 binary ground-truth labels of study i (moderate or worse counts, as the evaluator reads it)."""
    def sig(name):
        return int(s[name][i] >= 2)

    return {
        "pacemaker": int(s["pacemaker"][i]), "impella": int(s["impella"][i]), "tavr": int(s["tavr"][i]),
        "mitraclip": int(s["mitraclip"][i]), "aortic_root_dilation": sig("root_dilation"),
        "left_atrium_dilation": sig("la_dilation"), "right_atrium_dilation": sig("ra_dilation"),
        "right_ventricle_dilation": sig("rv_dilation"), "aortic_stenosis": sig("aortic_stenosis"),
        "mitral_stenosis": sig("mitral_stenosis"), "tricuspid_stenosis": sig("tricuspid_stenosis"),
        "aortic_regurgitation": sig("aortic_regurgitation"), "mitral_regurgitation": sig("mitral_regurgitation"),
        "tricuspid_valve_regurgitation": sig("tricuspid_regurgitation"),
        "pulmonic_valve_regurgitation": sig("pulmonic_regurgitation"), "mitral_annular_calcification": sig("mac"),
        "bicuspid_aov_morphology": int(s["bicuspid"][i]), "dilated_ivc": int(s["dilated_ivc"][i]),
        "pericardial_effusion": sig("effusion"), "rv_systolic_function_depressed": sig("rv_dysfunction"),
        "elevated_left_atrial_pressure": int(s["la_pressure"][i]), "wall_motion_hypokinesis": int(s["hypokinesis"][i]),
        "atrial_septum_hypertrophy": sig("septal_lipoma"),
    }


# ------------------------------------------------------------------------------------------------ report text
# Wording rules the evaluator relies on: a positive finding says moderate/severe (or an unambiguous device or
# shape word); a negative one says none/mild/trace/small or is negated; one finding per sentence, so no
# severity word or negation can be read as belonging to the neighbouring finding.

MILD = ["mild", "mild", "trace", "mild to moderate"]
MODERATE = ["moderate", "moderate", "moderate to severe"]
SEVERE = ["severe"]


def _sev(r: random.Random, g: int, mild=MILD) -> str:
    return r.choice(mild if g == 1 else MODERATE if g == 2 else SEVERE)


def _size(r: random.Random, g: int, chamber: str) -> str:
    """Chamber size sentence: 'The left atrium is moderately dilated.' / '... is normal in size.'"""
    if g == 0:
        return r.choice([f"The {chamber} is normal in size.", f"Normal {chamber} size."])
    adverb = ["mildly", "moderately", "severely"][g - 1]
    return r.choice([f"The {chamber} is {adverb} dilated.", f"The {chamber} is {adverb} enlarged.",
                     f"{adverb.capitalize()} dilated {chamber}."])


def _regurgitation(r: random.Random, g: int, valve: str, none_words=("No", "There is no")) -> str:
    if g == 0:
        return f"{r.choice(none_words)} {valve} regurgitation."
    sev = _sev(r, g)
    return r.choice([f"{sev.capitalize()} {valve} regurgitation.", f"There is {sev} {valve} regurgitation."])


def _stenosis(r: random.Random, g: int, valve: str) -> str:
    if g == 0:
        return r.choice([f"No {valve} stenosis.", f"There is no {valve} stenosis."])
    sev = _sev(r, g, ["mild"])
    return r.choice([f"{sev.capitalize()} {valve} stenosis.", f"There is {sev} {valve} stenosis."])


def _left_ventricle(r, s, i, labels):
    ef = float(s["ef"][i])
    out = [_size(r, int(s["lv_dilation"][i]), "left ventricle")]
    out.append(r.choice(["Left ventricular wall thickness is normal.", "Normal left ventricular wall thickness.",
                         "There is mild concentric left ventricular hypertrophy."]))
    function = ("normal" if ef >= 53 else "mildly reduced" if ef >= 41 else "moderately reduced" if ef >= 30
                else "severely reduced")
    out.append(r.choice([f"Left ventricular systolic function is {function}.",
                         f"{function.capitalize()} left ventricular systolic function."]))
    style = r.randrange(4)
    if style == 0:
        labels["ejection_fraction"] = float(round(ef))
        out.append(f"LVEF {round(ef)}%.")
    elif style == 1:
        lo = 5 * math.floor(ef / 5)
        labels["ejection_fraction"] = lo + 2.5
        out.append(f"The ejection fraction is estimated at {lo}-{lo + 5}%.")
    elif style == 2:
        labels["ejection_fraction"] = float(round(ef))
        out.append(f"Ejection fraction by Simpson's biplane is {round(ef)}%.")
    else:
        labels["ejection_fraction"] = float(round(ef))
        out.append(f"The left ventricular ejection fraction is estimated to be {round(ef)} %.")
    if s["la_pressure"][i]:
        out.append(r.choice(["E/e' is elevated, consistent with elevated left atrial pressure.",
                             "Doppler parameters suggest elevated left atrial pressure."]))
    else:
        out.append(r.choice(["Doppler parameters are consistent with normal left atrial pressure.",
                             "Left atrial pressure appears normal by Doppler."]))
    if s["impella"][i]:
        out.append(r.choice(["An Impella device is seen with its inlet in the left ventricle.",
                             "Impella catheter in place across the left ventricular outflow tract."]))
    return out


def _wall_motion(r, s, i, labels):
    if not s["hypokinesis"][i]:
        return [r.choice(["No regional wall motion abnormalities.", "Regional wall motion is normal.",
                          "There are no regional wall motion abnormalities."])]
    if s["ef"][i] < 30 and r.random() < 0.5:
        return [r.choice(["There is global hypokinesis of the left ventricle.", "Global left ventricular hypokinesis."])]
    walls = r.sample(["anterior", "anteroseptal", "inferior", "inferolateral", "lateral", "apical"], r.randint(1, 3))
    where = " and ".join(walls)
    return [r.choice([f"The {where} walls are hypokinetic.", f"There is hypokinesis of the {where} walls.",
                      f"{where.capitalize()} hypokinesis."])]


def _right_ventricle(r, s, i, labels):
    out = [_size(r, int(s["rv_dilation"][i]), "right ventricle")]
    g = int(s["rv_dysfunction"][i])
    tapse = r.uniform(*[(1.8, 2.6), (1.5, 1.8), (1.1, 1.5), (0.7, 1.1)][g])
    if g == 0:
        out.append(r.choice(["Right ventricular systolic function is normal.", "Normal right ventricular systolic function."]))
    else:
        adverb = ["mildly", "moderately", "severely"][g - 1]
        out.append(r.choice([f"Right ventricular systolic function is {adverb} reduced.",
                             f"{adverb.capitalize()} depressed right ventricular systolic function."]))
    out.append(f"TAPSE {tapse:.1f} cm.")
    if s["pacemaker"][i]:
        out.append(r.choice(["A pacemaker lead is seen in the right ventricle.", "An ICD lead is present in the right ventricle.",
                             "Pacer wire noted in the right heart."]))
    return out


def _left_atrium(r, s, i, labels):
    g = int(s["la_dilation"][i])
    lavi = r.uniform(*[(20, 34), (35, 41), (42, 48), (49, 70)][g])
    return [_size(r, g, "left atrium"), f"LA volume index {lavi:.0f} mL/m2."]


def _right_atrium(r, s, i, labels):
    return [_size(r, int(s["ra_dilation"][i]), "right atrium")]


def _atrial_septum(r, s, i, labels):
    out = [r.choice(["The interatrial septum is intact by color Doppler.", "No interatrial shunt is seen."])]
    g = int(s["septal_lipoma"][i])
    if g:
        sev = _sev(r, g, ["mild"])
        out.append(r.choice([f"There is {sev} lipomatous hypertrophy of the interatrial septum.",
                             f"{sev.capitalize()} lipomatous hypertrophy of the atrial septum."]))
    return out


def _mitral_valve(r, s, i, labels):
    out = []
    g = int(s["mac"][i])
    if g == 0:
        out.append("The mitral leaflets are structurally normal.")
    else:
        sev = _sev(r, g, ["mild"])
        out.append(r.choice([f"There is {sev} mitral annular calcification.", f"{sev.capitalize()} mitral annular calcification."]))
    g = int(s["mitral_stenosis"][i])
    out.append(_stenosis(r, g, "mitral"))
    if g:
        gradient = r.uniform(*[(3, 5), (5, 10), (10, 16)][g - 1])
        out.append(f"Mean transmitral gradient {gradient:.0f} mmHg.")
    if s["mitraclip"][i]:
        out.append(r.choice(["A MitraClip is seen on the mitral leaflets.", "Two MitraClips are in place on the mitral leaflets.",
                             "Status post edge-to-edge repair with a MitraClip."]))
        g = int(s["mitral_regurgitation"][i])
        out.append(f"{_sev(r, g, ['mild', 'trace']).capitalize()} residual mitral regurgitation.")
    else:
        out.append(_regurgitation(r, int(s["mitral_regurgitation"][i]), "mitral"))
    return out


def _aortic_valve(r, s, i, labels):
    out = []
    if s["tavr"][i]:
        out.append(r.choice(["A transcatheter aortic valve (TAVR) is in place and appears well seated.",
                             "Status post TAVR; the transcatheter aortic valve prosthesis is well seated."]))
        out.append(f"Mean gradient across the prosthesis {r.uniform(5, 15):.0f} mmHg.")
    else:
        out.append(r.choice(["The aortic valve is bicuspid.", "The aortic valve is likely bicuspid."]) if s["bicuspid"][i]
                   else r.choice(["The aortic valve is trileaflet.", "Trileaflet aortic valve."]))
        g = int(s["aortic_stenosis"][i])
        out.append(_stenosis(r, g, "aortic"))
        if g:
            vmax = r.uniform(*[(2.6, 2.9), (3.0, 3.9), (4.0, 5.2)][g - 1])
            out.append(f"Peak velocity {vmax:.1f} m/s, mean gradient {vmax ** 2 * 2.4:.0f} mmHg.")
    out.append(_regurgitation(r, int(s["aortic_regurgitation"][i]), "aortic"))
    return out


def _tricuspid_valve(r, s, i, labels):
    out = [_stenosis(r, int(s["tricuspid_stenosis"][i]), "tricuspid")]
    g = int(s["tricuspid_regurgitation"][i])
    out.append(_regurgitation(r, g, "tricuspid", ("No", "There is no", "No significant")))
    return out


def _pulmonic_valve(r, s, i, labels):
    return [r.choice(["The pulmonic valve is normal.", "Pulmonic valve leaflets appear normal."]),
            _regurgitation(r, int(s["pulmonic_regurgitation"][i]), "pulmonic")]


def _pericardium(r, s, i, labels):
    g = int(s["effusion"][i])
    if g == 0:
        return [r.choice(["No pericardial effusion.", "There is no pericardial effusion."])]
    size = r.choice([["trivial", "small"], ["moderate", "moderate to large"], ["large"]][g - 1])
    out = [r.choice([f"There is a {size} pericardial effusion.", f"{size.capitalize()} circumferential pericardial effusion."])]
    if s["tamponade"][i]:
        out.append("There are echocardiographic signs of tamponade.")
    return out


def _aorta(r, s, i, labels):
    g = int(s["root_dilation"][i])
    size = r.uniform(*[(2.7, 3.6), (3.7, 4.1), (4.2, 4.6), (4.7, 5.5)][g])
    if g == 0:
        return [r.choice([f"The aortic root is normal in size, measuring {size:.1f} cm.", f"Normal aortic root ({size:.1f} cm)."])]
    adverb = ["mildly", "moderately", "severely"][g - 1]
    return [r.choice([f"The aortic root is {adverb} dilated, measuring {size:.1f} cm.",
                      f"{adverb.capitalize()} dilated aortic root ({size:.1f} cm)."])]


def _ivc(r, s, i, labels):
    d = float(s["ivc"][i])
    if s["dilated_ivc"][i]:
        return [r.choice([f"The IVC is dilated ({d:.1f} cm) with less than 50% inspiratory collapse.",
                          f"Dilated inferior vena cava measuring {d:.1f} cm."]),
                "Findings suggest elevated right atrial pressure."]
    return [r.choice([f"The IVC is normal in size ({d:.1f} cm) with normal inspiratory collapse.",
                      f"Inferior vena cava diameter {d:.1f} cm, collapses normally with inspiration."])]


def _pulmonary_artery(r, s, i, labels):
    out = [r.choice(["The main pulmonary artery is normal in size.", "Normal main pulmonary artery diameter."])]
    # a real report often lacks a measurable tricuspid jet; the label is then absent, as an evaluator reads it
    if r.random() < 0.12:
        labels["pulmonary_artery_pressure_continuous"] = None
        out.append("PA systolic pressure could not be estimated because the tricuspid jet was inadequate.")
        return out
    p = round(float(s["pasp"][i]))
    labels["pulmonary_artery_pressure_continuous"] = float(p)
    out.append(r.choice([f"The estimated PA systolic pressure is {p} mmHg.",
                         f"Estimated pulmonary artery systolic pressure is {p} mmHg.", f"PASP {p} mmHg."]))
    return out


def _pulmonary_veins(r, s, i, labels):
    if s["la_pressure"][i] and r.random() < 0.5:
        return ["Systolic blunting of pulmonary venous flow."]
    return [r.choice(["Pulmonary venous flow pattern is normal.", "Normal pulmonary venous inflow."])]


def _postoperative(r, s, i, labels):
    out = []
    if s["tavr"][i]:
        out.append("Status post transcatheter aortic valve replacement.")
    if s["mitraclip"][i]:
        out.append("Status post MitraClip repair of the mitral valve.")
    if s["pacemaker"][i]:
        out.append(r.choice(["Status post pacemaker implantation.", "Permanent pacemaker in place."]))
    return out or [r.choice(["No prior cardiac surgery or devices.", "None."])]


WRITERS = [_left_ventricle, _wall_motion, _right_ventricle, _left_atrium, _right_atrium, _atrial_septum,
           _mitral_valve, _aortic_valve, _tricuspid_valve, _pulmonic_valve, _pericardium, _aorta, _ivc,
           _pulmonary_artery, _pulmonary_veins, _postoperative]


class FastRandom(random.Random):
    """random.Random whose choice is one C call instead of rejection sampling: text assembly is the hot loop."""

    def choice(self, seq):
        return seq[int(self.random() * len(seq))]


def write_report(r: random.Random, s: dict[str, list], i: int) -> tuple[str, dict]:
    """Report text of study i and its 25 labels (continuous ones as the report states them).

    s holds the states as Python lists (s[k][i] on a numpy array is several times slower)."""
    labels = labels_from_state(s, i)
    lines = [f"{name}: " + " ".join(writer(r, s, i, labels)) for name, writer in zip(SECTIONS, WRITERS)]
    return "\n".join(lines), {k: labels[k] for k in TRAITS}


# ------------------------------------------------------------------------------------------------ embeddings
def state_features(s: dict[str, np.ndarray]) -> np.ndarray:
    """(n, F) float32: continuous state standardised by fixed constants, grades scaled to 0..1, flags 0/1."""
    cols = [(s[k] - mu) / sd for k, (mu, sd) in CONTINUOUS.items()]
    cols += [s[k] / 3.0 for k in GRADED]
    cols += [s[k].astype(np.float64) for k in FLAGS]
    return np.stack(cols, axis=1).astype(np.float32)


def projection(embed_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed 'encoder' network (W1, b1, W2); the same for every dataset of this width."""
    rng = np.random.default_rng([PROJECTION_SEED, embed_dim])
    n_features = len(CONTINUOUS) + len(GRADED) + len(FLAGS)
    w1 = rng.standard_normal((n_features, HIDDEN)).astype(np.float32) * (2.0 / math.sqrt(n_features))
    b1 = rng.normal(0, 0.5, HIDDEN).astype(np.float32)
    w2 = rng.standard_normal((HIDDEN, embed_dim)).astype(np.float32) / math.sqrt(HIDDEN)
    return w1, b1, w2


def embed_states(rng: np.random.Generator, s: dict[str, np.ndarray], signal: float, views: int,
                 embed_dim: int) -> np.ndarray:
    """(n * views, D) float32 L2-normalised embeddings, the views of study i in rows i*views .. i*views+views-1."""
    w1, b1, w2 = projection(embed_dim)
    h = np.tanh(state_features(s) @ w1 + b1) @ w2
    h /= np.sqrt((h ** 2).mean(axis=1, keepdims=True))  # unit RMS per study, like the noise below
    h = np.repeat(h, views, axis=0)
    e = math.sqrt(signal) * h + math.sqrt(1.0 - signal) * rng.standard_normal(h.shape, dtype=np.float32)
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ public API
@dataclass
class SyntheticStudies:
    studies: list[str]
    patients: list[str]
    reports: list[str]
    labels: list[dict]
    embeddings: np.ndarray  # (M, D) float32
    offsets: np.ndarray  # (N + 1,) int64: study i owns embeddings[offsets[i]:offsets[i + 1]]
    states: dict[str, np.ndarray]


def _check(n_studies, signal, videos_per_study, embed_dim):
    if n_studies < 1:
        raise ValueError(f"n_studies must be at least 1, got {n_studies}")
    if not 0.0 <= signal <= 1.0:
        raise ValueError(f"signal must be between 0 and 1, got {signal}")
    if videos_per_study < 1:
        raise ValueError(f"videos_per_study must be at least 1, got {videos_per_study}")
    if embed_dim < 2:
        raise ValueError(f"embed_dim must be at least 2, got {embed_dim}")


def iter_chunks(n_studies: int, seed: int = 0, signal: float = DEFAULT_SIGNAL, videos_per_study: int = 1,
                embed_dim: int = 512):
    """Yield SyntheticStudies of up to CHUNK studies each, in study order, n_studies in all."""
    _check(n_studies, signal, videos_per_study, embed_dim)
    for c in range(math.ceil(n_studies / CHUNK)):
        rng, s, studies, patients = _chunk(n_studies, seed, c)
        n = len(studies)
        r = FastRandom(int(rng.integers(2 ** 63)))
        rows = {k: v[:n].tolist() for k, v in s.items()}
        texts, labels = zip(*(write_report(r, rows, i) for i in range(n)))
        # a full chunk always: study i must not depend on n_studies, not even in the last bit of a matmul
        emb = embed_states(rng, s, signal, videos_per_study, embed_dim)[:n * videos_per_study]
        yield SyntheticStudies(studies=studies, patients=patients, reports=list(texts), labels=list(labels),
                               embeddings=emb, offsets=np.arange(n + 1, dtype=np.int64) * videos_per_study,
                               states={k: v[:n] for k, v in s.items()})


def _chunk(n_studies: int, seed: int, c: int):
    """Random stream, the full chunk's states, and the ids of its first min(CHUNK, studies left) studies."""
    n = min(CHUNK, n_studies - c * CHUNK)
    rng = np.random.default_rng([seed, c])
    s = sample_states(rng, CHUNK)
    studies = [f"SYN{c * CHUNK + i:08d}" for i in range(n)]
    patients = [f"SYNP{c:05d}-{p:04d}" for p in s["patient"][:n]]
    return rng, s, studies, patients


def study_and_patient_ids(n_studies: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """The ids `iter_chunks` will give, without writing reports or embeddings (splits are fixed before streaming)."""
    _check(n_studies, 0.0, 1, 2)
    studies, patients = [], []
    for c in range(math.ceil(n_studies / CHUNK)):
        _, _, st, pa = _chunk(n_studies, seed, c)
        studies += st
        patients += pa
    return studies, patients
