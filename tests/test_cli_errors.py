"""Config mistakes fail before training with one line naming the field to fix."""

from cpt_lightning.cli import condense_parse_error

JSONARGPARSE_UNKNOWN_CLASS = """Parser key "trainer.callbacks":
  Does not validate against any of the Union subtypes
  Subtypes: [list[lightning.pytorch.callbacks.callback.Callback], <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'callbacks.ObjectiveSchedule':
        Parser key "phases":
          Problem with given class_path 'callbacks.Phase':
            Parser key "objective":
              Problem with given class_path 'cpt_lightning.objectives.CasualLM':
                module 'cpt_lightning.objectives' has no attribute 'CasualLM'
    - Not a valid subclass of Callback
    - Expected a <class 'NoneType'>
  Given value type: <class 'list'>"""


def test_condensed_error_is_the_path_to_the_problem():
    assert condense_parse_error(JSONARGPARSE_UNKNOWN_CLASS) == (
        "trainer.callbacks → callbacks.ObjectiveSchedule → phases → callbacks.Phase → objective → "
        "cpt_lightning.objectives.CasualLM: module 'cpt_lightning.objectives' has no attribute 'CasualLM'"
    )


def test_plain_messages_pass_through():
    message = "Subcommand 'fit' does not accept option 'trainer.max_epoch'"
    assert condense_parse_error(message) == message
