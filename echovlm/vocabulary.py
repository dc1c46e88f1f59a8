"""The report vocabulary both sides agree on: the 16 report sections in order, and the 25 scored traits.

The synthetic generator (echovlm/synthetic.py) writes reports in these sections and labels these traits; the
evaluator (echovlm/clinical.py) reads the same sections and extracts the same traits. One list here, so the
two can never drift apart.
"""

SECTIONS = ["Left Ventricle", "Resting Segmental Wall Motion Analysis", "Right Ventricle", "Left Atrium",
            "Right Atrium", "Atrial Septum", "Mitral Valve", "Aortic Valve", "Tricuspid Valve", "Pulmonic Valve",
            "Pericardium", "Aorta", "IVC", "Pulmonary Artery", "Pulmonary Veins", "Postoperative Findings"]

# positive only at moderate or worse where the trait is graded
BINARY_TRAITS = [
    "pacemaker", "impella", "tavr", "mitraclip", "aortic_root_dilation", "left_atrium_dilation",
    "right_atrium_dilation", "right_ventricle_dilation", "aortic_stenosis", "mitral_stenosis",
    "tricuspid_stenosis", "aortic_regurgitation", "mitral_regurgitation", "tricuspid_valve_regurgitation",
    "pulmonic_valve_regurgitation", "mitral_annular_calcification", "bicuspid_aov_morphology", "dilated_ivc",
    "pericardial_effusion", "rv_systolic_function_depressed", "elevated_left_atrial_pressure",
    "wall_motion_hypokinesis", "atrial_septum_hypertrophy",
]
CONTINUOUS_TRAITS = ["ejection_fraction", "pulmonary_artery_pressure_continuous"]  # LVEF (%), PA systolic (mmHg)
TRAITS = {**{t: "binary" for t in BINARY_TRAITS}, **{t: "continuous" for t in CONTINUOUS_TRAITS}}

# BPE tokens that spell the reports, the 3 special tokens included: tok_train's, the benchmarks' and the model
# config's default (a leaf module, so speedrun.sh and the CLIs read it without importing torch or rustbpe)
DEFAULT_VOCAB_SIZE = 2000
