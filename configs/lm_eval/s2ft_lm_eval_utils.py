"""Written by `s2ft lm-eval-tasks`: LLM-Adapters records -> lm-eval multiple choice (s2ft.loglik)."""

from s2ft.integrations.lm_eval import doc_to_choice, doc_to_target, doc_to_text, process_docs_for

process_boolq = process_docs_for('boolq')
process_piqa = process_docs_for('piqa')
process_social_i_qa = process_docs_for('social_i_qa')
process_arc_easy = process_docs_for('ARC-Easy')
process_arc_challenge = process_docs_for('ARC-Challenge')
process_openbookqa = process_docs_for('openbookqa')
process_hellaswag = process_docs_for('hellaswag')
process_winogrande = process_docs_for('winogrande')
